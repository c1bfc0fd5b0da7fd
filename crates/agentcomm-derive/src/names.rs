//! Checks of class names and directions, the same rules the runtime applies to channel components.

use proc_macro2::TokenStream;
use quote::quote;
use syn::parse::ParseStream;

/// Where the generated code finds agentcomm-core: `::agentcomm_core` unless the user says otherwise
/// with `crate = path` (for a crate that renames the dependency in its Cargo.toml, or reaches
/// agentcomm-core through a re-export).
pub fn private_path(krate: Option<&syn::Path>) -> TokenStream {
    match krate {
        Some(path) => quote!(#path::__private),
        None => quote!(::agentcomm_core::__private),
    }
}

/// `tokens` with every span set to `span`: a path written by the macro but reported on a user's
/// token (a diagnostic points at a path's first token).
pub fn respan(tokens: TokenStream, span: proc_macro2::Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}

/// The value of a `crate = ..` or `validate = ..` key: a path, or a string holding one (`crate =
/// "comm"`, `validate = "Self::check"`, as serde writes its paths).
pub fn parse_path_value(input: ParseStream<'_>) -> syn::Result<syn::Path> {
    if input.peek(syn::LitStr) {
        let literal: syn::LitStr = input.parse()?;
        literal.parse()
    } else {
        input.parse()
    }
}

/// The longest component, as in `agentcomm_core::channel::MAX_COMPONENT_LEN`.
const MAX_COMPONENT_LEN: usize = 80;

/// Why `value` cannot be a channel component, if it cannot.
pub fn component_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("it is empty".into());
    }
    if value.contains('*') {
        return Some("'*' is the pattern wildcard".into());
    }
    if value.contains(':') {
        return Some("':' separates channel components".into());
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("it contains {c:?}"));
    }
    if value.len() > MAX_COMPONENT_LEN {
        return Some(format!("it is longer than {MAX_COMPONENT_LEN} bytes"));
    }
    None
}

/// Why `class` cannot be a message class, if it cannot.
pub fn class_problem(class: &str) -> Option<String> {
    if let Some(problem) = component_problem(class) {
        return Some(problem);
    }
    if class == "DeadLetter" {
        return Some("`DeadLetter` is the class of dead-letter channels".into());
    }
    if class.starts_with("agentcomm.") {
        return Some("the `agentcomm.` prefix is reserved".into());
    }
    None
}

/// The names of the variables the generated code declares. A user's lowercase `const` or `static` of
/// the same name in scope would turn a `let` or a parameter of that name into a pattern matching the
/// constant (a type mismatch, or "cannot shadow"), so each name is also declared as a function in a
/// block around the generated impl ([`shielded`]): that inner item hides the user's constant there,
/// and a function is never a pattern. The prefix keeps the functions from hiding a user's own.
pub const SESSION: &str = "__agentcomm_session";
/// See [`SESSION`].
pub const CTX: &str = "__agentcomm_ctx";
/// See [`SESSION`].
pub const CLASS: &str = "__agentcomm_class";
/// See [`SESSION`].
pub const MESSAGE: &str = "__agentcomm_message";
/// See [`SESSION`].
pub const CHECK: &str = "__agentcomm_check";
/// See [`SESSION`].
pub const VALUE: &str = "__agentcomm_value";

/// `items` in an anonymous `const` block that first declares a function named after each of `names`,
/// so that variables of those names in `items` are bindings whatever the caller's scope holds.
pub fn shielded(names: &[&str], items: TokenStream) -> TokenStream {
    let shields = names.iter().map(|name| {
        let ident = syn::Ident::new(name, proc_macro2::Span::call_site());
        // No `#[allow(dead_code)]`: a name that starts with `_` is not reported unused, and an
        // `allow` would be an error where the caller forbids that lint.
        quote! {
            fn #ident() {}
        }
    });
    quote! {
        const _: () = {
            #(#shields)*
            #items
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_the_runtime() {
        assert_eq!(component_problem("PaymentRequest"), None);
        assert_eq!(component_problem("billing.v2"), None);
        assert!(component_problem("").is_some());
        assert!(component_problem("a:b").is_some());
        assert!(component_problem("a*").is_some());
        assert!(component_problem("a b").is_some());
        assert!(component_problem(&"x".repeat(81)).is_some());
        assert!(class_problem("DeadLetter").is_some());
        assert!(class_problem("agentcomm.Thing").is_some());
    }
}
