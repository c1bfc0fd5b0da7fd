//! Procedural macros of agentcomm: `#[derive(Message)]` and `#[agent(...)]`.
//!
//! Use them through `agentcomm-core` (`use agentcomm_core::prelude::*;`), which re-exports them and
//! whose documentation describes them. This crate is a thin shell: the logic lives in plain functions
//! (`message`, `agent`, `template`) that unit tests call directly.

#![deny(missing_docs)]

mod agent;
mod message;
mod names;
mod serde_names;
mod template;

use proc_macro::TokenStream;

/// Derives `agentcomm_core::Message`.
///
/// Container attributes: `#[message(name = "Class", channel = "template", direction = "request",
/// validate = path::to::fn, crate = path)]`. Field attributes: `#[message(non_empty)]`,
/// `#[message(min = 0)]`, `#[message(max = 100)]`; on an `Option` field, `min` and `max` bound the value
/// inside and pass `None` (a bound written as an `Option`, `Some(..)`, compares the `Option`s as
/// before; `non_empty` counts `None` as empty); `#[message(nested)]` on a field whose type is a Message
/// (or an `Option`, `Vec`, `VecDeque`, slice, array, `Box`, or the values of a map, of Messages)
/// checks that type's rules too, naming the path in the error (`items[2].sku`). Errors name a field
/// as serde does on the wire (`#[serde(rename = "..")]` and `#[serde(rename_all = "..")]` apply, and
/// the fields of a `#[serde(flatten)]` field are named alone). `crate` says where agentcomm-core is when it is
/// not `::agentcomm_core` (a dependency renamed in Cargo.toml, or a re-export).
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    message::expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Declares an agent: `#[agent(receives = [A, B], sends = [C], name = "Optional", crate = path)]` on
/// a struct (`crate` as for `Message`). Each type in `receives` needs an `impl Handle<T>`, and a
/// handler for a type not in `receives` does not compile (the runtime would never call it).
#[proc_macro_attribute]
pub fn agent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(item as syn::Item);
    agent::expand(args.into(), item)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
