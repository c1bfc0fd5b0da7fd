//! Messages: the typed payloads agents exchange.
//!
//! Derive [`Message`] on a serde type; the derive gives it a class name (the type's name unless
//! `#[message(name = "...")]` says otherwise), a channel template (checked when it compiles), a default
//! direction and optional validation rules (`non_empty`, `min = ..`, `max = ..` on fields; on an `Option`
//! field `min` and `max` bound the value inside, and a `None` passes them; `nested` on a field whose type
//! is a message, or an `Option`, `Vec`, `Box` or map of messages, checks their rules too, and the error
//! names the path, `items[2].sku`; a field is named as serde names it on the wire, after
//! `#[serde(rename = "..")]` or `#[serde(rename_all = "..")]`, as in serde's own errors):
//!
//! ```
//! use agentcomm_core::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Message)]
//! #[message(direction = "request", validate = Self::check)]
//! struct PaymentRequest {
//!     #[message(min = 0.01)]
//!     amount: f64,
//!     #[message(non_empty)]
//!     user_id: String,
//! }
//!
//! impl PaymentRequest {
//!     fn check(&self) -> Result<(), ValidationError> {
//!         if self.amount > 10_000.0 && self.user_id.starts_with("guest") {
//!             return Err(ValidationError::new("amount", "guest_limit").with_detail("guests pay at most 10000"));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! assert_eq!(PaymentRequest::CLASS, "PaymentRequest");
//! let bad = PaymentRequest { amount: 0.0, user_id: "u1".into() };
//! let error = bad.validate().unwrap_err();
//! assert_eq!((error.field(), error.rule()), ("amount", "min"));
//! ```
//!
//! The generated code names `::agentcomm_core`. A crate that renames the dependency in its Cargo.toml
//! (`comm = { package = "agentcomm-core", .. }`), or reaches it through a re-export, says where it is
//! with `crate = path` on each macro: `#[message(crate = comm)]`, `#[agent(crate = comm, receives =
//! [..])]`.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::channel::{Channel, ChannelPattern, ChannelTemplate};
use crate::error::Result;

/// A typed message. Derive it with `#[derive(Message)]`; do not implement it by hand unless you know
/// the class name and template rules (the derive checks them when your crate compiles).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an agentcomm Message",
    label = "not a Message",
    note = "derive it: `#[derive(Serialize, Deserialize, Message)]` on `{Self}`"
)]
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The class name: stable, unique in the system, and the first component of the channel.
    const CLASS: &'static str;

    /// How channels of this message are named on the broker.
    const TEMPLATE: ChannelTemplate = ChannelTemplate::DEFAULT;

    /// The direction used when a message is published without one (`#[message(direction = "...")]`).
    const DIRECTION: &'static str = "event";

    /// Where the derive met the type (file, module, name, line and column): two derived types differ
    /// here even when they have one class name (two versions of one crate's type too), which
    /// `#[agent(...)]` refuses between what an agent receives and what it sends. Empty for a type that
    /// implements `Message` by hand. Generated; not for direct use.
    #[doc(hidden)]
    const __DEFINED_AT: &'static str = "";

    /// Checks the message's own rules. Run before every publish and after every decode; a message that
    /// fails is never published and never reaches a handler.
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }

    /// The channel of this message type for `direction` and `session`.
    fn channel(direction: &str, session: &str) -> Result<Channel>
    where
        Self: Sized,
    {
        Channel::for_message::<Self>(direction, session)
    }

    /// The pattern matching every channel of this message type (any direction, any session).
    fn pattern() -> ChannelPattern
    where
        Self: Sized,
    {
        ChannelPattern::for_message::<Self>(None, None)
            .expect("a pattern with only the class fixed is valid for a derived message")
    }
}

/// A message that broke one of its rules: which field, which rule, and optionally why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    field: Cow<'static, str>,
    rule: Cow<'static, str>,
    detail: Option<String>,
}

impl ValidationError {
    /// `field` broke `rule`.
    pub fn new(field: impl Into<Cow<'static, str>>, rule: impl Into<Cow<'static, str>>) -> Self {
        ValidationError {
            field: field.into(),
            rule: rule.into(),
            detail: None,
        }
    }

    /// Adds an explanation for the user.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The field that broke the rule.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The rule that was broken.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// The explanation, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` breaks rule `{}`", self.field, self.rule)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Checks used by the derive's field rules. Not for direct use.
#[doc(hidden)]
pub mod rules {
    use super::ValidationError;

    /// A value that can be empty.
    #[diagnostic::on_unimplemented(
        message = "`#[message(non_empty)]` cannot check a `{Self}`",
        label = "`{Self}` has no notion of empty here",
        note = "non_empty checks strings (blank counts as empty), Vec, VecDeque, HashMap, BTreeMap, HashSet, BTreeSet, Box of those, and Option of those (None counts as empty); check other types in a function named by #[message(validate = path)]"
    )]
    pub trait IsEmpty {
        /// Whether it is empty.
        fn rule_is_empty(&self) -> bool;
    }
    impl IsEmpty for String {
        fn rule_is_empty(&self) -> bool {
            self.trim().is_empty()
        }
    }
    impl IsEmpty for str {
        fn rule_is_empty(&self) -> bool {
            self.trim().is_empty()
        }
    }
    impl<T> IsEmpty for Vec<T> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<T> IsEmpty for std::collections::VecDeque<T> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<T, S> IsEmpty for std::collections::HashSet<T, S> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<T> IsEmpty for std::collections::BTreeSet<T> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<T: IsEmpty + ?Sized> IsEmpty for Box<T> {
        fn rule_is_empty(&self) -> bool {
            (**self).rule_is_empty()
        }
    }
    impl<K, V, S> IsEmpty for std::collections::HashMap<K, V, S> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<K, V> IsEmpty for std::collections::BTreeMap<K, V> {
        fn rule_is_empty(&self) -> bool {
            self.is_empty()
        }
    }
    impl<T: IsEmpty> IsEmpty for Option<T> {
        fn rule_is_empty(&self) -> bool {
            self.as_ref().is_none_or(IsEmpty::rule_is_empty)
        }
    }

    /// A value whose own rules a `nested` field rule checks: a [`Message`](super::Message), and the
    /// `Option`, `Vec`, `VecDeque`, slice, array, `Box` and map (values) of those.
    #[diagnostic::on_unimplemented(
        message = "`#[message(nested)]` cannot check a `{Self}`",
        label = "`{Self}` is not a Message, nor a container of Messages",
        note = "nested checks the rules of a field whose type derives Message, and of Option, Vec, VecDeque, slices, arrays, Box and the values of HashMap and BTreeMap of those; check other types in a function named by #[message(validate = path)]"
    )]
    pub trait Nested {
        /// Checks the value's rules; `path` names it (`items[2]`) in the error.
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError>;
    }
    /// The path of a nested value, made only for an error.
    pub type NestedPath<'a> = &'a dyn Fn() -> String;

    /// [`Nested`] for a derived message (the derive implements it with this): its rules, the error's
    /// field prefixed with `path` (the path alone for an error that names no field, about the whole
    /// message).
    pub fn nested_message<M: super::Message>(
        message: &M,
        path: NestedPath<'_>,
    ) -> Result<(), ValidationError> {
        message.validate().map_err(|error| ValidationError {
            // A path is empty for a field serde flattens into the message: its fields are the
            // message's own on the wire.
            field: match (path(), error.field.as_ref()) {
                (path, "") => path,
                (path, field) if path.is_empty() => field.to_string(),
                (path, field) => format!("{path}.{field}"),
            }
            .into(),
            ..error
        })
    }
    impl<T: Nested> Nested for Option<T> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            self.as_ref()
                .map_or(Ok(()), |value| value.rule_nested(path))
        }
    }
    impl<T: Nested + ?Sized> Nested for Box<T> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            (**self).rule_nested(path)
        }
    }
    /// The items of a sequence, each named by its index.
    fn nested_items<'a, T: Nested + 'a>(
        items: impl IntoIterator<Item = &'a T>,
        path: NestedPath<'_>,
    ) -> Result<(), ValidationError> {
        for (index, item) in items.into_iter().enumerate() {
            item.rule_nested(&|| format!("{}[{index}]", path()))?;
        }
        Ok(())
    }
    impl<T: Nested> Nested for [T] {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_items(self, path)
        }
    }
    impl<T: Nested, const N: usize> Nested for [T; N] {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_items(self, path)
        }
    }
    impl<T: Nested> Nested for Vec<T> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_items(self, path)
        }
    }
    impl<T: Nested> Nested for std::collections::VecDeque<T> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_items(self, path)
        }
    }
    /// The values of a map, each named by its key.
    fn nested_values<'a, K: std::fmt::Debug + 'a, V: Nested + 'a>(
        entries: impl IntoIterator<Item = (&'a K, &'a V)>,
        path: NestedPath<'_>,
    ) -> Result<(), ValidationError> {
        for (key, value) in entries {
            value.rule_nested(&|| format!("{}[{key:?}]", path()))?;
        }
        Ok(())
    }
    impl<K: std::fmt::Debug, V: Nested, S> Nested for std::collections::HashMap<K, V, S> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_values(self, path)
        }
    }
    impl<K: std::fmt::Debug, V: Nested> Nested for std::collections::BTreeMap<K, V> {
        fn rule_nested(&self, path: NestedPath<'_>) -> Result<(), ValidationError> {
            nested_values(self, path)
        }
    }

    /// `nested`: the rules of the field's own type, the error naming the path to the value that broke
    /// one (`items[2].sku`).
    pub fn nested<T: Nested + ?Sized>(
        field: &'static str,
        value: &T,
    ) -> Result<(), ValidationError> {
        value.rule_nested(&|| field.to_string())
    }

    /// `non_empty`.
    pub fn non_empty<T: IsEmpty + ?Sized>(
        field: &'static str,
        value: &T,
    ) -> Result<(), ValidationError> {
        if value.rule_is_empty() {
            Err(ValidationError::new(field, "non_empty").with_detail("must not be empty"))
        } else {
            Ok(())
        }
    }

    /// `min = bound`.
    pub fn min<T: PartialOrd + std::fmt::Debug>(
        field: &'static str,
        value: &T,
        bound: T,
    ) -> Result<(), ValidationError> {
        // `!(value >= bound)` so that NaN fails too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(*value >= bound) {
            Err(ValidationError::new(field, "min")
                .with_detail(format!("must be at least {bound:?}, got {value:?}")))
        } else {
            Ok(())
        }
    }

    /// `max = bound`.
    pub fn max<T: PartialOrd + std::fmt::Debug>(
        field: &'static str,
        value: &T,
        bound: T,
    ) -> Result<(), ValidationError> {
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(*value <= bound) {
            Err(ValidationError::new(field, "max")
                .with_detail(format!("must be at most {bound:?}, got {value:?}")))
        } else {
            Ok(())
        }
    }

    /// The bound of a `min` or `max` rule on an `Option<T>` field (`V`): a `T`, compared with the value
    /// inside when there is one (`None` breaks no bound), or an `Option<T>`, compared with the field as
    /// an `Option` (`None` is below every `Some`), as such a bound always was.
    #[diagnostic::on_unimplemented(
        message = "a `min` or `max` bound on a field of type `{V}` is neither of the type inside it nor of the field's type",
        label = "this bound is a `{Self}`"
    )]
    pub trait OptionalBound<V>: Sized {
        /// The value of `field` to compare with the bound, if any.
        fn bounded(field: &V) -> Option<&Self>;
    }
    impl<T> OptionalBound<Option<T>> for T {
        fn bounded(field: &Option<T>) -> Option<&T> {
            field.as_ref()
        }
    }
    impl<T> OptionalBound<Option<T>> for Option<T> {
        fn bounded(field: &Option<T>) -> Option<&Option<T>> {
            Some(field)
        }
    }

    /// `min = bound` on an `Option` field.
    pub fn min_optional<V, B: OptionalBound<V> + PartialOrd + std::fmt::Debug>(
        field: &'static str,
        value: &V,
        bound: B,
    ) -> Result<(), ValidationError> {
        B::bounded(value).map_or(Ok(()), |value| min(field, value, bound))
    }

    /// `max = bound` on an `Option` field.
    pub fn max_optional<V, B: OptionalBound<V> + PartialOrd + std::fmt::Debug>(
        field: &'static str,
        value: &V,
        bound: B,
    ) -> Result<(), ValidationError> {
        B::bounded(value).map_or(Ok(()), |value| max(field, value, bound))
    }
}
