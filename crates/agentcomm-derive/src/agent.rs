//! `#[agent(receives = [..], sends = [..])]`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Item, LitStr, Token, Type};

use crate::message::path_text;
use crate::names::{self, component_problem, parse_path_value, private_path, respan};

#[derive(Default)]
struct AgentArgs {
    receives: Vec<Type>,
    sends: Vec<Type>,
    name: Option<LitStr>,
    krate: Option<syn::Path>,
}

fn parse_args(input: ParseStream<'_>) -> syn::Result<AgentArgs> {
    let mut args = AgentArgs::default();
    let mut seen: Vec<String> = Vec::new();
    while !input.is_empty() {
        let key: syn::Path = input.parse()?;
        let key_text = path_text(&key);
        if seen.contains(&key_text) {
            return Err(syn::Error::new(
                key.span(),
                format!("`{key_text}` is given twice"),
            ));
        }
        input.parse::<Token![=]>()?;
        match key_text.as_str() {
            "receives" | "sends" => {
                if !input.peek(syn::token::Bracket) {
                    let example = match input.fork().parse::<Type>() {
                        Ok(ty) => quote!(#ty).to_string().replace(' ', ""),
                        Err(_) => "Type".into(),
                    };
                    return Err(input.error(format!(
                        "`{key_text}` takes a list in square brackets, even of one type: `{key_text} = [{example}]`"
                    )));
                }
                let content;
                syn::bracketed!(content in input);
                let types: Punctuated<Type, Token![,]> = Punctuated::parse_terminated(&content)?;
                let list: Vec<Type> = types.into_iter().collect();
                check_unique(&list, &key_text)?;
                if key_text == "receives" {
                    args.receives = list;
                } else {
                    args.sends = list;
                }
            }
            "name" => args.name = Some(input.parse()?),
            "crate" => args.krate = Some(parse_path_value(input)?),
            other => {
                let hint = match other {
                    "receive" | "recieves" | "recv" | "handles" | "messages" => {
                        " (did you mean `receives`?)"
                    }
                    "send" | "sending_messages" | "publishes" | "emits" => {
                        " (did you mean `sends`?)"
                    }
                    _ => "",
                };
                return Err(syn::Error::new(
                    key.span(),
                    format!(
                        "unknown key `{other}` in #[agent(...)]{hint}; the keys are `receives = [..]`, `sends = [..]`, `name = \"..\"` and `crate = path`"
                    ),
                ));
            }
        }
        seen.push(key_text);
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    Ok(args)
}

fn check_unique(types: &[Type], list: &str) -> syn::Result<()> {
    for (index, ty) in types.iter().enumerate() {
        let text = quote!(#ty).to_string();
        if types[..index]
            .iter()
            .any(|earlier| quote!(#earlier).to_string() == text)
        {
            return Err(syn::Error::new(
                ty.span(),
                format!("`{}` is listed twice in `{list}`", text.replace(' ', "")),
            ));
        }
    }
    Ok(())
}

pub fn expand(args: TokenStream, item: Item) -> syn::Result<TokenStream> {
    let args = parse_args.parse2(args)?;
    let Item::Struct(structure) = &item else {
        return Err(syn::Error::new(
            Span::call_site(),
            "#[agent(...)] goes on a struct: the agent's state (use a unit struct `struct MyAgent;` when it has none)",
        ));
    };
    let ident = &structure.ident;
    if !structure.generics.params.is_empty() {
        return Err(syn::Error::new(
            structure.generics.span(),
            "an agent cannot be generic or borrow: it runs on its own task for as long as the \
             runtime does, so it owns its state ('static; use Arc for what it shares), and every \
             instantiation would share one name and so one consumer group; define one concrete type \
             per agent",
        ));
    }
    let (impl_generics, type_generics, where_clause) = structure.generics.split_for_impl();
    let name = match &args.name {
        Some(name) => {
            if let Some(problem) = component_problem(&name.value()) {
                return Err(syn::Error::new(
                    name.span(),
                    format!("`{}` cannot be an agent name: {problem}", name.value()),
                ));
            }
            name.value()
        }
        None => ident.unraw().to_string(),
    };
    let core = private_path(args.krate.as_ref());

    let receives = &args.receives;
    let sends = &args.sends;
    let received_classes = receives
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> <#ty as #core::Message>::CLASS));
    let sent_classes = sends
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> <#ty as #core::Message>::CLASS));
    let sent_templates = sends
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> <#ty as #core::Message>::TEMPLATE));
    // Every use of a listed type goes through a projection `<T as Message>::..` with the type's span, so
    // that a type which is not a Message yields one error (identical diagnostics are merged), not one per use.
    // The generated functions' own variables keep the call-site span they are declared with: written
    // inside `quote_spanned!` they would take the type's span, which names a different scope when the
    // type comes from a `macro_rules!` argument (`cannot find value `ctx` in this scope`).
    let ident_of = |name: &str| syn::Ident::new(name, Span::call_site());
    let (session, class, ctx, message, this) = (
        ident_of(names::SESSION),
        ident_of(names::CLASS),
        ident_of(names::CTX),
        ident_of(names::MESSAGE),
        quote!(self),
    );
    let patterns = receives.iter().map(|ty| {
        quote_spanned! {ty.span()=>
            #core::ChannelPattern::with_template(
                <#ty as #core::Message>::TEMPLATE,
                #core::Some(<#ty as #core::Message>::CLASS),
                #core::None,
                #session,
            )?
        }
    });
    let dispatch_arms = receives.iter().map(|ty| {
        quote_spanned! {ty.span()=>
            if #class == <#ty as #core::Message>::CLASS {
                let #message = #core::decode_message::<#ty>(#ctx.envelope())?;
                return #core::Ok(#core::Box::pin(<Self as #core::Handle<#ty>>::handle(#this, #message, #ctx)));
            }
        }
    });
    let sends_impls = sends.iter().map(|ty| {
        // The whole trait path on the type, so that "`T` is not an agentcomm Message" points at `T`.
        let sends = respan(quote!(#core::Sends), ty.span());
        // `Sends` requires this marker, which only the macro writes: an `impl Sends<T>` by hand fails.
        let listed = respan(quote!(#core::ListedInSends), ty.span());
        quote_spanned! {ty.span()=>
            #[automatically_derived]
            impl #impl_generics #sends<#ty> for #ident #type_generics #where_clause {}
            #[automatically_derived]
            impl #impl_generics #listed<#ty> for #ident #type_generics #where_clause {}
        }
    });
    // One marker impl per received type: a type listed twice through two paths, which `check_unique`
    // cannot see, conflicts here (E0119 on the second entry) instead of being refused at spawn as two
    // types of one class name.
    let listed_impls = receives.iter().map(|ty| {
        let listed = respan(quote!(#core::ListedInReceives), ty.span());
        quote_spanned! {ty.span()=>
            #[automatically_derived]
            impl #impl_generics #listed<#ty> for #ident #type_generics #where_clause {}
        }
    });
    // A received type and a different sent type of one class name (`v1::Order` and `v2::Order`, both
    // `Order` by default) share their channels: the agent would receive what it sends, decoded as the
    // received type, and an agent that sends on what it receives would loop for ever. The classes are
    // known when the crate compiles, so the check is a constant; one type (written the same way, or
    // through an alias or another path) has one `__DEFINED_AT`.
    let type_text = |ty: &Type| quote!(#ty).to_string().replace(' ', "");
    // Each projection on its own type's span, as above, so that a type which is not a Message
    // still yields one error.
    let of = |ty: &Type, item: &str| {
        let item = syn::Ident::new(item, Span::call_site());
        // `Self` (an agent that is a message itself) means nothing in a constant outside the
        // impl: the agent's name stands for it (agents have no generics).
        if type_text(ty) == "Self" {
            quote_spanned!(ty.span()=> <#ident as #core::Message>::#item)
        } else {
            quote_spanned!(ty.span()=> <#ty as #core::Message>::#item)
        }
    };
    // The constant refusing `first` and `second` (different types as written) when they have one class
    // but are not one type, with `problem` (what would go wrong) in the error.
    let class_check = |first: &Type, second: &Type, problem: String| {
        if type_text(first) == type_text(second) {
            return None;
        }
        let text = format!(
            "agent `{name}` {problem}; give one of them another class with #[message(name = \"...\")]"
        )
        // A literal `panic!` reads braces (an agent name may hold some) as formatting.
        .replace('{', "{{")
        .replace('}', "}}");
        let (first_class, second_class) = (of(first, "CLASS"), of(second, "CLASS"));
        let (first_at, second_at) = (of(first, "__DEFINED_AT"), of(second, "__DEFINED_AT"));
        Some(quote_spanned! {second.span()=>
            const _: () = if #core::same_class(#first_class, #second_class)
                && !#core::same_class(#first_at, #second_at)
            {
                ::core::panic!(#text)
            };
        })
    };
    let mut class_checks = Vec::new();
    for received in receives {
        for sent in sends {
            class_checks.extend(class_check(
                received,
                sent,
                format!(
                    "receives `{}` and sends `{}`, two types of one class name, so it would receive what it sends (and one that sends on what it receives would loop for ever)",
                    type_text(received),
                    type_text(sent)
                ),
            ));
        }
    }
    // Two received types of one class: the runtime dispatches a delivery by its class, so it could not
    // tell them apart. `spawn` refuses such an agent (also for `Message`s written by hand); a derived
    // one is refused when it compiles. One type listed twice (through an alias) is the
    // `ListedInReceives` impls' error.
    for (index, first) in receives.iter().enumerate() {
        for second in &receives[index + 1..] {
            class_checks.extend(class_check(
                first,
                second,
                format!(
                    "receives `{}` and `{}`, two types of one class name, so a delivery could not be told apart",
                    type_text(first),
                    type_text(second)
                ),
            ));
        }
    }
    let agent_impl = quote! {
        #[automatically_derived]
        impl #impl_generics #core::Agent for #ident #type_generics #where_clause {
            const NAME: &'static str = #name;
            const RECEIVES: &'static [&'static str] = &[#(#received_classes),*];
            const SENDS: &'static [&'static str] = &[#(#sent_classes),*];
            const __SENDS_TEMPLATES: &'static [#core::ChannelTemplate] = &[#(#sent_templates),*];

            fn __receive_patterns(
                #session: #core::Option<&str>,
            ) -> #core::Result<#core::Vec<#core::ChannelPattern>> {
                let _ = #session;
                #core::Ok(::std::vec![#(#patterns),*])
            }

            fn __dispatch<'a>(
                &'a self,
                #ctx: &'a #core::Context<Self>,
            ) -> #core::Result<#core::BoxFuture<'a, #core::HandlerResult>, #core::Rejection> {
                let #class = #ctx.envelope().class();
                #(#dispatch_arms)*
                #core::Err(#core::undeclared(<Self as #core::Agent>::NAME, #class))
            }
        }
    };
    let agent_impl = names::shielded(
        &[names::SESSION, names::CTX, names::CLASS, names::MESSAGE],
        agent_impl,
    );
    Ok(quote! {
        #item

        #agent_impl

        #(#sends_impls)*

        #(#listed_impls)*

        #(#class_checks)*
    })
}
