//! `#[derive(Message)]`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Expr, Fields, LitStr, Path, PathArguments, Type};

use crate::names::{self, class_problem, component_problem, parse_path_value, private_path};
use crate::serde_names;
use crate::template::{self, Part};

#[derive(Default)]
struct ContainerOptions {
    name: Option<LitStr>,
    channel: Option<LitStr>,
    direction: Option<LitStr>,
    validate: Option<Path>,
    krate: Option<Path>,
}

enum FieldRule {
    NonEmpty,
    Nested,
    Min(Expr),
    Max(Expr),
}

pub fn expand(input: DeriveInput) -> syn::Result<TokenStream> {
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
            "a Message cannot be generic: every instantiation would share one class name; \
             define one concrete type per message",
        ));
    }
    let options = container_options(&input)?;
    let private = private_path(options.krate.as_ref());

    let class = match &options.name {
        Some(name) => name.value(),
        // `r#type` is the class `type`, as serde names such a field.
        None => ident.unraw().to_string(),
    };
    let class_span = options.name.as_ref().map_or(ident.span(), LitStr::span);
    if let Some(problem) = class_problem(&class) {
        let fix = if options.name.is_some() {
            "choose another name"
        } else {
            "set one with #[message(name = \"...\")]"
        };
        return Err(syn::Error::new(
            class_span,
            format!("`{class}` cannot be a message class: {problem}; {fix}"),
        ));
    }

    let template = match &options.channel {
        Some(literal) => {
            let parts = template::parse(&literal.value())
                .map_err(|message| syn::Error::new(literal.span(), message))?;
            check_separators(&parts, literal, &class, &options)?;
            let parts = parts.iter().map(|part| match part {
                Part::Literal(text) => {
                    quote!(#private::TemplatePart::Literal(#text))
                }
                Part::Class => quote!(#private::TemplatePart::Class),
                Part::Direction => quote!(#private::TemplatePart::Direction),
                Part::Session => quote!(#private::TemplatePart::Session),
            });
            quote! {
                const TEMPLATE: #private::ChannelTemplate =
                    #private::ChannelTemplate::__from_checked_parts(#literal, &[#(#parts),*]);
            }
        }
        None => TokenStream::new(),
    };

    let direction = match &options.direction {
        Some(literal) => {
            if let Some(problem) = component_problem(&literal.value()) {
                return Err(syn::Error::new(
                    literal.span(),
                    format!("`{}` cannot be a direction: {problem}", literal.value()),
                ));
            }
            if literal.value() == "reply" {
                return Err(syn::Error::new(
                    literal.span(),
                    "`reply` is reserved for replies routed to a requester's inbox, which agents do not receive; use another direction (replies to requests are sent with `Context::reply`)",
                ));
            }
            quote!(const DIRECTION: &'static str = #literal;)
        }
        None => TokenStream::new(),
    };

    let mut checks = field_checks(&input, &private)?;
    if let Some(path) = &options.validate {
        // `self` keeps the call-site span of the method's receiver (see `field_checks`).
        let this = quote!(self);
        let check = syn::Ident::new(names::CHECK, proc_macro2::Span::call_site());
        checks.push(quote_spanned! {path.span()=>
            {
                let #check: fn(&Self) -> #private::Result<(), #private::ValidationError> = #path;
                #check(#this)?;
            }
        });
    }
    let validate = if checks.is_empty() {
        TokenStream::new()
    } else {
        quote! {
            fn validate(&self) -> #private::Result<(), #private::ValidationError> {
                #(#checks)*
                #private::Ok(())
            }
        }
    };

    // The name's own location: types that a `macro_rules!` macro defines in one invocation still differ.
    // The file too: two versions of one crate in a build (`orders_v1 = { package = "orders", version =
    // "1" }` beside version 2) have one module path, and their `Order` often the same line and column;
    // their sources are two files. Only compared while compiling, never kept in the binary.
    let ident_text = ident.unraw().to_string();
    let defined_at = quote_spanned! {ident.span()=>
        ::core::concat!(
            ::core::file!(),
            ":",
            ::core::module_path!(),
            "::",
            #ident_text,
            "@",
            ::core::line!(),
            ":",
            ::core::column!()
        )
    };
    let message_impl = quote! {
        #[automatically_derived]
        impl #private::Message for #ident {
            const CLASS: &'static str = #class;
            const __DEFINED_AT: &'static str = #defined_at;
            #template
            #direction
            #validate
        }

        #[automatically_derived]
        impl #private::rules::Nested for #ident {
            fn rule_nested(
                &self,
                path: #private::rules::NestedPath<'_>,
            ) -> #private::Result<(), #private::ValidationError> {
                #private::rules::nested_message(self, path)
            }
        }
    };
    Ok(names::shielded(&[names::CHECK, names::VALUE], message_impl))
}

/// The class and the default direction are known now, and so is what the template splits channel names
/// at: a class or direction containing its separator would make every channel of the type invalid at
/// run time (each publish failing, `Message::pattern()` panicking), so it is refused here, on the
/// literal to change. So is a separator after the session that reply inbox sessions contain: every
/// request waiting for a reply of this type would fail.
fn check_separators(
    parts: &[Part],
    channel: &LitStr,
    class: &str,
    options: &ContainerOptions,
) -> syn::Result<()> {
    let template = channel.value();
    if let Some(separator) = template::separator_after(parts, &Part::Class)
        && class.contains(separator)
    {
        let (span, fix) = match &options.name {
            Some(name) => (
                name.span(),
                "choose a class name without it, or another separator after `{class}` in the template",
            ),
            None => (
                channel.span(),
                "put another separator after `{class}` in the template, or set a class name without it with #[message(name = \"...\")]",
            ),
        };
        return Err(syn::Error::new(
            span,
            format!(
                "the class `{class}` contains '{separator}', which separates `{{class}}` from the next component in channel template \"{template}\", so no channel of this type could be named; {fix}"
            ),
        ));
    }
    if let Some(separator) = template::separator_after(parts, &Part::Session)
        && INBOX_SESSION_CHARACTERS.contains(separator)
    {
        return Err(syn::Error::new(
            channel.span(),
            format!(
                "'{separator}' after `{{session_id}}` in channel template \"{template}\" would be forbidden in sessions, but a request waits for its reply on the session `inbox-<32 hex digits>` (and UUID session ids contain '-'), so no request could get a reply of this type; put a character that is neither '-', a hex digit nor a letter of `inbox` after `{{session_id}}` (e.g. '.')"
            ),
        ));
    }
    let direction = options
        .direction
        .as_ref()
        .map_or_else(|| DEFAULT_DIRECTION.to_string(), LitStr::value);
    if let Some(separator) = template::separator_after(parts, &Part::Direction)
        && direction.contains(separator)
    {
        let (span, which, fix) = match &options.direction {
            Some(literal) => (
                literal.span(),
                "the direction",
                "choose a direction without it, or another separator after `{direction}` in the template",
            ),
            None => (
                channel.span(),
                "the default direction",
                "put another separator after `{direction}` in the template, or set a direction without it with #[message(direction = \"...\")]",
            ),
        };
        return Err(syn::Error::new(
            span,
            format!(
                "{which} `{direction}` contains '{separator}', which separates `{{direction}}` from the next component in channel template \"{template}\", so the type's channels could not be named; {fix}"
            ),
        ));
    }
    Ok(())
}

/// The characters of a reply inbox's session: `agentcomm_core::channel::INBOX_PREFIX` (`inbox-`) and a
/// UUID in simple form (lowercase hex), as `agentcomm_core::bus` names it.
const INBOX_SESSION_CHARACTERS: &str = "inbox-0123456789abcdef";

/// `agentcomm_core::Message::DIRECTION` when the type does not set one.
const DEFAULT_DIRECTION: &str = "event";

fn container_options(input: &DeriveInput) -> syn::Result<ContainerOptions> {
    let mut options = ContainerOptions::default();
    for attribute in input.attrs.iter().filter(|a| a.path().is_ident("message")) {
        attribute.parse_nested_meta(|meta| {
            let set_once = |slot: &mut Option<LitStr>, meta: &syn::meta::ParseNestedMeta<'_>| -> syn::Result<()> {
                if slot.is_some() {
                    return Err(meta.error("this key is given twice"));
                }
                *slot = Some(meta.value()?.parse()?);
                Ok(())
            };
            if meta.path.is_ident("name") {
                set_once(&mut options.name, &meta)
            } else if meta.path.is_ident("channel") {
                set_once(&mut options.channel, &meta)
            } else if meta.path.is_ident("direction") {
                set_once(&mut options.direction, &meta)
            } else if meta.path.is_ident("validate") {
                if options.validate.is_some() {
                    return Err(meta.error(
                        "this key is given twice; call both checks from one function",
                    ));
                }
                let path = parse_path_value(meta.value()?)?;
                check_not_itself(&path, &input.ident)?;
                options.validate = Some(path);
                Ok(())
            } else if meta.path.is_ident("crate") {
                if options.krate.is_some() {
                    return Err(meta.error("this key is given twice"));
                }
                options.krate = Some(parse_path_value(meta.value()?)?);
                Ok(())
            } else {
                Err(meta.error(format!(
                    "unknown key `{}` in #[message(...)]; the keys are `name`, `channel`, `direction`, `validate` and `crate`",
                    path_text(&meta.path)
                )))
            }
        })?;
    }
    Ok(options)
}

/// Refuses a `validate` path that names the type's own `validate`: `Message::validate`, and, without an
/// inherent method of that name, `Self::validate`, is the very method the derive writes, which would then
/// call itself until the stack overflows (the process aborts at the first publish or decode). With
/// one, `message.validate()` would call it instead of the derived checks, skipping the field rules.
fn check_not_itself(path: &Path, ident: &syn::Ident) -> syn::Result<()> {
    let segments: Vec<_> = path.segments.iter().collect();
    let [.., owner, last] = segments.as_slice() else {
        return Ok(());
    };
    if last.ident == "validate"
        && (owner.ident == "Self" || owner.ident == "Message" || owner.ident == *ident)
    {
        return Err(syn::Error::new(
            last.ident.span(),
            format!(
                "`{}` names the method `Message::validate` that this derive writes, which would call itself for ever (or, with a method `validate` of your own, hide the field rules from `message.validate()`); name your check otherwise, e.g. `fn check(&self) -> Result<(), ValidationError>` with #[message(validate = Self::check)]",
                path_text(path)
            ),
        ));
    }
    Ok(())
}

fn field_checks(input: &DeriveInput, private: &TokenStream) -> syn::Result<Vec<TokenStream>> {
    let mut checks = Vec::new();
    let fields = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) => named.named.iter().collect::<Vec<_>>(),
            other => {
                if let Some(field) = other
                    .iter()
                    .find(|f| f.attrs.iter().any(|a| a.path().is_ident("message")))
                {
                    return Err(syn::Error::new(
                        field.span(),
                        "field rules need named fields: use a struct with named fields",
                    ));
                }
                Vec::new()
            }
        },
        Data::Enum(data) => {
            // The derive declares `message` as its helper attribute, so the compiler accepts it on a
            // variant too; the derive reads none there.
            if let Some(attribute) = data
                .variants
                .iter()
                .flat_map(|variant| &variant.attrs)
                .find(|a| a.path().is_ident("message"))
            {
                return Err(syn::Error::new(
                    attribute.span(),
                    "#[message(...)] on an enum's variant has no effect: the class, channel and direction \
                     are the whole enum's (put them on the enum), and rules are for the fields of a \
                     struct; check the variants in a function named by #[message(validate = path)]",
                ));
            }
            let ruled = data
                .variants
                .iter()
                .flat_map(|variant| variant.fields.iter())
                .find(|f| f.attrs.iter().any(|a| a.path().is_ident("message")));
            if let Some(field) = ruled {
                return Err(syn::Error::new(
                    field.span(),
                    "field rules are for the fields of a struct, not of an enum's variants; check \
                     the variants in a function named by #[message(validate = path)]",
                ));
            }
            Vec::new()
        }
        Data::Union(_) => Vec::new(),
    };
    // `self` is written with the call-site span of the `validate` method's receiver: inside
    // `quote_spanned!` it would take the field's span, which names another scope when the field comes
    // from a `macro_rules!` argument (`self` value is a keyword only available in methods ...).
    let this = quote!(self);
    for field in fields {
        let ident = field.ident.as_ref().expect("named fields have names");
        // The name on the wire, as serde's own errors give it (`userId` under `rename_all = "camelCase"`).
        let name = serde_names::wire_name(&input.attrs, field);
        // The field is passed to the rule as one local spanned on the field's name: an argument
        // `&self.field` would mix that span with the receiver's, and a rule the field's type cannot
        // take would then be reported on the derive instead of on the field.
        let value = syn::Ident::new(names::VALUE, ident.span());
        let optional = is_option(&field.ty);
        for rule in field_rules(field)? {
            let check = match rule {
                FieldRule::NonEmpty => quote_spanned! {ident.span()=>
                    #private::rules::non_empty(#name, #value)?;
                },
                FieldRule::Nested => {
                    let path = if serde_names::is_flattened(field) {
                        String::new()
                    } else {
                        name.clone()
                    };
                    quote_spanned! {ident.span()=>
                        #private::rules::nested(#path, #value)?;
                    }
                }
                // An optional field's bound applies to its value when it has one: compared as an
                // `Option`, `None` is below every `Some`, so `min = Some(..)` would refuse every message
                // without the field and `max = Some(..)` would let it through. A bound written as an
                // `Option` (`max = Some(0.5)`, what such a field needed before) is still compared as one.
                FieldRule::Min(bound) if optional => quote_spanned! {bound.span()=>
                    #private::rules::min_optional(#name, #value, #bound)?;
                },
                FieldRule::Max(bound) if optional => quote_spanned! {bound.span()=>
                    #private::rules::max_optional(#name, #value, #bound)?;
                },
                FieldRule::Min(bound) => quote_spanned! {bound.span()=>
                    #private::rules::min(#name, #value, #bound)?;
                },
                FieldRule::Max(bound) => quote_spanned! {bound.span()=>
                    #private::rules::max(#name, #value, #bound)?;
                },
            };
            checks.push(quote! {
                {
                    let #value = &#this.#ident;
                    #check
                }
            });
        }
    }
    Ok(checks)
}

/// Whether `ty` is written `Option<..>` (or `std::option::Option<..>`, ...): its `min` and `max`
/// bounds are then of the type inside, and checked only when the field holds a value.
fn is_option(ty: &Type) -> bool {
    let Type::Path(path) = ty else {
        return false;
    };
    path.qself.is_none()
        && path.path.segments.last().is_some_and(|last| {
            last.ident == "Option"
                && matches!(&last.arguments, PathArguments::AngleBracketed(arguments) if arguments.args.len() == 1)
        })
}

fn field_rules(field: &syn::Field) -> syn::Result<Vec<FieldRule>> {
    let mut rules = Vec::new();
    for attribute in field.attrs.iter().filter(|a| a.path().is_ident("message")) {
        attribute.parse_nested_meta(|meta| {
            if meta.path.is_ident("non_empty") {
                rules.push(FieldRule::NonEmpty);
            } else if meta.path.is_ident("nested") {
                rules.push(FieldRule::Nested);
            } else if meta.path.is_ident("min") {
                rules.push(FieldRule::Min(meta.value()?.parse()?));
            } else if meta.path.is_ident("max") {
                rules.push(FieldRule::Max(meta.value()?.parse()?));
            } else {
                return Err(meta.error(format!(
                    "unknown field rule `{}`; the rules are `non_empty`, `nested`, `min = ..` and `max = ..`",
                    path_text(&meta.path)
                )));
            }
            Ok(())
        })?;
    }
    Ok(rules)
}

pub fn path_text(path: &Path) -> String {
    path.segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}
