//! The names serde gives a struct's fields on the wire (`#[serde(rename = "..")]` on the field,
//! `#[serde(rename_all = "..")]` on the struct), so that a field rule's error names the field as the
//! message holds it, as serde's own errors ("missing field `userId`") do.
//!
//! Only reads serde's attributes: one this module cannot read leaves the Rust name (serde's derive
//! reports the attribute's own mistakes).

use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, ExprLit, Field, Lit, Meta, Token};

/// The name of `field` on the wire, given the attributes of its struct.
pub fn wire_name(container: &[Attribute], field: &Field) -> String {
    let ident = field
        .ident
        .as_ref()
        .expect("named fields have names")
        .unraw()
        .to_string();
    if let Some(renamed) = serde_value(&field.attrs, "rename") {
        return renamed;
    }
    match serde_value(container, "rename_all") {
        Some(rule) => apply_rule(&rule, &ident).unwrap_or(ident),
        None => ident,
    }
}

/// The string of `key` in serde's attributes as serde reads a message: `key = "value"`, or
/// `key(deserialize = "value", ..)`. A rule's error is about a message that was read (a dead
/// letter's reason), and serde's own errors give that name ("missing field"); a
/// `serialize`-only name is not the one the message held.
fn serde_value(attributes: &[Attribute], key: &str) -> Option<String> {
    let mut found = None;
    for attribute in attributes.iter().filter(|a| a.path().is_ident("serde")) {
        let Ok(items) = attribute.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
        else {
            continue;
        };
        for item in items {
            match item {
                Meta::NameValue(pair) if pair.path.is_ident(key) => {
                    if let Some(value) = string(&pair.value) {
                        found = Some(value);
                    }
                }
                Meta::List(list) if list.path.is_ident(key) => {
                    let Ok(sides) =
                        list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
                    else {
                        continue;
                    };
                    let side = |name: &str| {
                        sides.iter().find_map(|side| match side {
                            Meta::NameValue(pair) if pair.path.is_ident(name) => {
                                string(&pair.value)
                            }
                            _ => None,
                        })
                    };
                    if let Some(value) = side("deserialize") {
                        found = Some(value);
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// Whether serde flattens `field` (`#[serde(flatten)]`): its own fields are then the message's on the
/// wire, and a nested rule names them alone.
pub fn is_flattened(field: &Field) -> bool {
    field
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("serde"))
        .filter_map(|a| {
            a.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
                .ok()
        })
        .flatten()
        .any(|item| matches!(item, Meta::Path(path) if path.is_ident("flatten")))
}

fn string(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Some(text.value()),
        _ => None,
    }
}

/// `field` (a snake_case Rust name) under serde's `rename_all` rule `rule`; `None` for a rule serde
/// does not have.
fn apply_rule(rule: &str, field: &str) -> Option<String> {
    let pascal = || {
        let mut out = String::with_capacity(field.len());
        let mut upper_next = true;
        for c in field.chars() {
            if c == '_' {
                upper_next = true;
            } else if upper_next {
                out.push(c.to_ascii_uppercase());
                upper_next = false;
            } else {
                out.push(c);
            }
        }
        out
    };
    Some(match rule {
        "lowercase" | "snake_case" => field.to_string(),
        "UPPERCASE" | "SCREAMING_SNAKE_CASE" => field.to_ascii_uppercase(),
        "PascalCase" => pascal(),
        "camelCase" => {
            let pascal = pascal();
            let mut chars = pascal.chars();
            match chars.next() {
                Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
                None => pascal,
            }
        }
        "kebab-case" => field.replace('_', "-"),
        "SCREAMING-KEBAB-CASE" => field.to_ascii_uppercase().replace('_', "-"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(item: syn::ItemStruct) -> (Vec<Attribute>, Field) {
        let field = item.fields.iter().next().unwrap().clone();
        (item.attrs, field)
    }

    #[test]
    fn rules_give_serdes_names() {
        let cases = [
            ("lowercase", "user_id"),
            ("snake_case", "user_id"),
            ("UPPERCASE", "USER_ID"),
            ("SCREAMING_SNAKE_CASE", "USER_ID"),
            ("PascalCase", "UserId"),
            ("camelCase", "userId"),
            ("kebab-case", "user-id"),
            ("SCREAMING-KEBAB-CASE", "USER-ID"),
        ];
        for (rule, expected) in cases {
            assert_eq!(
                apply_rule(rule, "user_id").as_deref(),
                Some(expected),
                "{rule}"
            );
        }
        assert_eq!(apply_rule("Title Case", "user_id"), None);
    }

    #[test]
    fn a_fields_rename_wins_over_the_structs_rule() {
        let (attrs, field) = field_of(syn::parse_quote! {
            #[serde(rename_all = "camelCase")]
            struct S { #[serde(default, rename = "uid")] user_id: String }
        });
        assert_eq!(wire_name(&attrs, &field), "uid");
        let (attrs, field) = field_of(syn::parse_quote! {
            #[serde(deny_unknown_fields)]
            #[serde(rename_all(serialize = "kebab-case", deserialize = "kebab-case"))]
            struct S { #[serde(skip_serializing_if = "Option::is_none")] user_id: Option<String> }
        });
        assert_eq!(wire_name(&attrs, &field), "user-id");
        let (attrs, field) = field_of(syn::parse_quote! {
            struct S { #[serde(rename(deserialize = "in_name"))] r#type: String }
        });
        assert_eq!(wire_name(&attrs, &field), "in_name");
        // A name only for writing is not the one a message read held.
        let (attrs, field) = field_of(syn::parse_quote! {
            #[serde(rename_all(serialize = "kebab-case", deserialize = "camelCase"))]
            struct S { #[serde(rename(serialize = "out_name"))] user_id: String }
        });
        assert_eq!(wire_name(&attrs, &field), "userId");
        let (attrs, field) = field_of(syn::parse_quote! {
            #[derive(Clone)]
            struct S { #[serde(with = "module", bound = "T: Clone")] r#type: String }
        });
        assert_eq!(wire_name(&attrs, &field), "type");
        let (attrs, field) = field_of(syn::parse_quote! {
            #[serde(rename_all = "camelCase")]
            struct S { #[serde(flatten)] inner_part: Inner }
        });
        assert_eq!(wire_name(&attrs, &field), "innerPart");
        assert!(is_flattened(&field));
    }
}
