//! Channels, channel templates and subscription patterns.
//!
//! A channel names where a message travels: its class, a direction (`request`, `response`, `event`, ...)
//! and a session. Its canonical text form is `MessageClass:direction:session_id`; a message type may name
//! its channels differently on the broker with a template (`#[message(channel = "payments.{direction}.{session_id}")]`),
//! but the three components are what patterns match, whatever the template.
//!
//! [`ChannelPattern::matches`] is the one matcher: every backend subscribes with its own form of a pattern
//! (a Redis glob, an AMQP binding key) and filters what arrives with this function, so all backends agree.
//!
//! ```
//! use agentcomm_core::channel::{parse_channel, ChannelPattern};
//!
//! let channel = parse_channel("PaymentRequest:request:session456")?;
//! assert_eq!(channel.class(), "PaymentRequest");
//! assert_eq!(channel.direction(), "request");
//! assert_eq!(channel.session(), "session456");
//!
//! assert!(ChannelPattern::parse("PaymentRequest:*:*")?.matches(&channel));
//! assert!(ChannelPattern::parse("*:request:session456")?.matches(&channel));
//! assert!(!ChannelPattern::parse("*:response:*")?.matches(&channel));
//!
//! let error = parse_channel("invalid_format").unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "Channel 'invalid_format' has invalid format. Expected: 'MessageClass:direction:session_id', got: 'invalid_format'"
//! );
//! # Ok::<(), agentcomm_core::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{EXPECTED_CHANNEL_FORMAT, Error, Result};

/// The separator of the canonical channel form.
pub const SEPARATOR: char = ':';
/// The wildcard of a pattern component: matches any one value.
pub const WILDCARD: &str = "*";
/// The class of the channels dead letters are published to: `DeadLetter:<original class>:<session>`.
pub const DEAD_LETTER_CLASS: &str = "DeadLetter";
/// The direction replies to a request are published with when the request names no `reply_to`.
pub const RESPONSE_DIRECTION: &str = "response";
/// The direction of replies routed to a requester's inbox.
pub const REPLY_DIRECTION: &str = "reply";
/// How the session of a requester's inbox begins (`<ReplyClass>:reply:inbox-<id>`): agents whose
/// patterns match such a channel leave what arrives there to its requester.
pub const INBOX_PREFIX: &str = "inbox-";

/// Whether `channel` leads to a requester's inbox: direction `reply`, to an inbox session.
pub(crate) fn is_inbox(channel: &Channel) -> bool {
    channel.direction() == REPLY_DIRECTION && channel.session().starts_with(INBOX_PREFIX)
}

/// One piece of a [`ChannelTemplate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplatePart {
    /// Text copied as it is.
    Literal(&'static str),
    /// `{class}`: the message class.
    Class,
    /// `{direction}`.
    Direction,
    /// `{session_id}`.
    Session,
}

/// How a message type names its channels on the broker.
///
/// Templates are written in `#[message(channel = "...")]` and checked when the message type compiles:
/// the placeholders are `{class}`, `{direction}` and `{session_id}`, `{session_id}` is required, and two
/// placeholders must be separated by literal text. The default is `{class}:{direction}:{session_id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelTemplate {
    source: &'static str,
    parts: &'static [TemplatePart],
}

impl ChannelTemplate {
    /// `{class}:{direction}:{session_id}`.
    pub const DEFAULT: ChannelTemplate = ChannelTemplate {
        source: "{class}:{direction}:{session_id}",
        parts: &[
            TemplatePart::Class,
            TemplatePart::Literal(":"),
            TemplatePart::Direction,
            TemplatePart::Literal(":"),
            TemplatePart::Session,
        ],
    };

    /// Builds a template from parts the derive macro has already checked. Not for direct use.
    #[doc(hidden)]
    pub const fn __from_checked_parts(
        source: &'static str,
        parts: &'static [TemplatePart],
    ) -> Self {
        ChannelTemplate { source, parts }
    }

    /// The template as written.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The parts of the template.
    pub fn parts(&self) -> &'static [TemplatePart] {
        self.parts
    }

    /// Whether this is the default template.
    pub fn is_default(&self) -> bool {
        self.source == Self::DEFAULT.source
    }

    /// Whether the template contains a placeholder for this component.
    pub fn has(&self, part: TemplatePart) -> bool {
        self.parts.contains(&part)
    }

    /// The character a component may not contain under this template: the first character of the
    /// literal text that follows its placeholder (a name is split back at that character). `None` when
    /// the placeholder is last, absent, or followed by `:` (which no component contains anyway).
    pub fn separator_after(&self, placeholder: TemplatePart) -> Option<char> {
        let index = self.parts.iter().position(|part| *part == placeholder)?;
        match self.parts.get(index + 1) {
            Some(TemplatePart::Literal(text)) => text.chars().next().filter(|c| *c != SEPARATOR),
            _ => None,
        }
    }

    /// Renders the name of a channel.
    pub fn render(&self, class: &str, direction: &str, session: &str) -> String {
        let mut name = String::with_capacity(class.len() + direction.len() + session.len() + 8);
        for part in self.parts {
            name.push_str(match part {
                TemplatePart::Literal(text) => text,
                TemplatePart::Class => class,
                TemplatePart::Direction => direction,
                TemplatePart::Session => session,
            });
        }
        name
    }

    /// Renders a pattern for a broker: each fixed component goes through `escape`, each wildcard becomes
    /// `wildcard`. Redis uses it with `*` and glob escaping.
    pub fn render_pattern(
        &self,
        pattern: &ChannelPattern,
        wildcard: &str,
        escape: impl Fn(&str) -> String,
    ) -> String {
        let mut name = String::new();
        for part in self.parts {
            let component = match part {
                TemplatePart::Literal(text) => {
                    name.push_str(&escape(text));
                    continue;
                }
                TemplatePart::Class => pattern.class(),
                TemplatePart::Direction => pattern.direction(),
                TemplatePart::Session => pattern.session(),
            };
            match component {
                Some(value) => name.push_str(&escape(value)),
                None => name.push_str(wildcard),
            }
        }
        name
    }

    /// Splits a rendered name back into `(class, direction, session)`. A component the template does not
    /// contain comes back as `None`.
    pub fn split<'a>(&self, name: &'a str) -> Option<[Option<&'a str>; 3]> {
        let mut rest = name;
        let mut found: [Option<&'a str>; 3] = [None; 3];
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            match part {
                TemplatePart::Literal(text) => rest = rest.strip_prefix(text)?,
                placeholder => {
                    let end = match parts.peek() {
                        Some(TemplatePart::Literal(next)) => rest.find(next)?,
                        _ => rest.len(),
                    };
                    let value = &rest[..end];
                    rest = &rest[end..];
                    let slot = match placeholder {
                        TemplatePart::Class => 0,
                        TemplatePart::Direction => 1,
                        _ => 2,
                    };
                    found[slot] = Some(value);
                }
            }
        }
        rest.is_empty().then_some(found)
    }
}

impl fmt::Display for ChannelTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.source)
    }
}

/// The four strings of a channel in one allocation: `class`, `direction`, `session`, then the name.
struct ChannelInner {
    text: Box<str>,
    class_end: usize,
    direction_end: usize,
    session_end: usize,
    /// The channel's four fields as a MessagePack frame writes them, made on first use: written and
    /// recognised in one piece (most frames come on a channel used before).
    frame_fields: std::sync::OnceLock<Box<[u8]>>,
}

impl PartialEq for ChannelInner {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
            && self.class_end == other.class_end
            && self.direction_end == other.direction_end
            && self.session_end == other.session_end
    }
}

impl Eq for ChannelInner {}

impl std::hash::Hash for ChannelInner {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
        self.class_end.hash(state);
        self.direction_end.hash(state);
        self.session_end.hash(state);
    }
}

/// A channel: class, direction and session, and the name it has on the broker.
///
/// Cheap to clone (one reference count). Build one with [`Channel::new`] (default template),
/// [`Channel::for_message`] (the message type's template) or [`parse_channel`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Channel(Arc<ChannelInner>);

impl Channel {
    /// A channel with the default template, `class:direction:session`.
    pub fn new(class: &str, direction: &str, session: &str) -> Result<Self> {
        Self::with_template(&ChannelTemplate::DEFAULT, class, direction, session)
    }

    /// The channel of message type `M` for this direction and session, named with `M`'s template.
    pub fn for_message<M: crate::Message>(direction: &str, session: &str) -> Result<Self> {
        Self::with_template(&M::TEMPLATE, M::CLASS, direction, session)
    }

    /// A channel named with `template`. Every component is checked: it must be non-empty and contain
    /// neither `:`, `*`, whitespace, control characters, nor the character of the template that follows
    /// it ([`ChannelTemplate::separator_after`]).
    pub fn with_template(
        template: &ChannelTemplate,
        class: &str,
        direction: &str,
        session: &str,
    ) -> Result<Self> {
        validate_component(
            "class",
            class,
            template.separator_after(TemplatePart::Class),
        )?;
        validate_component(
            "direction",
            direction,
            template.separator_after(TemplatePart::Direction),
        )?;
        validate_component(
            "session",
            session,
            template.separator_after(TemplatePart::Session),
        )?;
        Ok(Self::from_parts_unchecked(
            class,
            direction,
            session,
            template.render(class, direction, session),
        ))
    }

    /// Builds a channel from parts that were already checked, with a name given by the caller.
    /// Backends use it after [`Channel::with_template`]-level checks of their own.
    pub(crate) fn from_parts_unchecked(
        class: &str,
        direction: &str,
        session: &str,
        name: String,
    ) -> Self {
        let mut text =
            String::with_capacity(class.len() + direction.len() + session.len() + name.len());
        text.push_str(class);
        let class_end = text.len();
        text.push_str(direction);
        let direction_end = text.len();
        text.push_str(session);
        let session_end = text.len();
        text.push_str(&name);
        Channel(Arc::new(ChannelInner {
            text: text.into_boxed_str(),
            class_end,
            direction_end,
            session_end,
            frame_fields: std::sync::OnceLock::new(),
        }))
    }

    /// The `class`, `channel`, `direction` and `session` fields of a MessagePack frame on this
    /// channel (for a message of the channel's class), as the frame writer writes them.
    pub(crate) fn frame_fields(&self) -> &[u8] {
        self.0
            .frame_fields
            .get_or_init(|| crate::frame_msgpack::channel_fields(self).into_boxed_slice())
    }

    /// Rebuilds a channel that arrived in an envelope: components are checked, the name is kept as sent.
    pub fn from_wire(class: &str, direction: &str, session: &str, name: &str) -> Result<Self> {
        validate_component("class", class, None)?;
        validate_component("direction", direction, None)?;
        validate_component("session", session, None)?;
        if name.is_empty() {
            return Err(Error::InvalidChannelFormat {
                channel: name.to_string(),
                expected: EXPECTED_CHANNEL_FORMAT.to_string(),
                detail: Some("the channel name is empty".into()),
            });
        }
        Ok(Self::from_parts_unchecked(
            class,
            direction,
            session,
            name.to_string(),
        ))
    }

    /// The message class component.
    pub fn class(&self) -> &str {
        &self.0.text[..self.0.class_end]
    }

    /// The direction component.
    pub fn direction(&self) -> &str {
        &self.0.text[self.0.class_end..self.0.direction_end]
    }

    /// The session component.
    pub fn session(&self) -> &str {
        &self.0.text[self.0.direction_end..self.0.session_end]
    }

    /// The name on the broker (the template's rendering).
    pub fn name(&self) -> &str {
        &self.0.text[self.0.session_end..]
    }

    /// The canonical form `class:direction:session`, whatever the template.
    pub fn canonical(&self) -> String {
        format!(
            "{}{SEPARATOR}{}{SEPARATOR}{}",
            self.class(),
            self.direction(),
            self.session()
        )
    }

    /// The dead-letter channel for messages that failed on this channel: `DeadLetter:<class>:<session>`.
    pub fn dead_letter(&self) -> Channel {
        let name = ChannelTemplate::DEFAULT.render(DEAD_LETTER_CLASS, self.class(), self.session());
        Self::from_parts_unchecked(DEAD_LETTER_CLASS, self.class(), self.session(), name)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({:?})", self.name())
    }
}

impl FromStr for Channel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        parse_channel(s)
    }
}

fn validate_component(component: &'static str, value: &str, separator: Option<char>) -> Result<()> {
    // One pass over the bytes finds every problem in the common all-ASCII case; this runs for every
    // channel that arrives in a frame, so it is on the hot path.
    let ascii_separator = separator.filter(char::is_ascii).map(|c| c as u8);
    let suspicious = value.bytes().any(|b| {
        b <= b' ' || b == 0x7f || b == b'*' || b == b':' || b >= 0x80 || Some(b) == ascii_separator
    });
    if !suspicious && !value.is_empty() && value.len() <= MAX_COMPONENT_LEN {
        return Ok(());
    }
    let fail = |reason: String| Error::InvalidChannelComponent {
        component,
        value: value.to_string(),
        reason,
        forbidden: separator.map(|c| format!("'{c}'")).unwrap_or_default(),
    };
    if value.is_empty() {
        return Err(fail("it is empty".into()));
    }
    if value.contains('*') {
        return Err(fail("'*' is the pattern wildcard".into()));
    }
    if value.contains(SEPARATOR) {
        return Err(fail("':' separates the components".into()));
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail(format!("it contains {c:?}")));
    }
    if let Some(c) = separator.filter(|c| value.contains(*c)) {
        return Err(fail(format!(
            "'{c}' separates it from the next component in the channel template"
        )));
    }
    if value.len() > MAX_COMPONENT_LEN {
        return Err(fail(format!(
            "it is {} bytes long, more than the {MAX_COMPONENT_LEN} allowed",
            value.len()
        )));
    }
    // Non-ASCII text without any of the problems above.
    Ok(())
}

/// The longest a channel component may be, in bytes. Brokers limit names (AMQP routing keys to 255
/// bytes), so a channel must fit in one.
pub const MAX_COMPONENT_LEN: usize = 80;

/// Parses a channel in the canonical form `MessageClass:direction:session_id`.
///
/// Fails with [`Error::InvalidChannelFormat`] unless there are exactly three non-empty components.
pub fn parse_channel(channel: &str) -> Result<Channel> {
    let [class, direction, session] = split_canonical(channel)?;
    for (component, value) in [
        ("class", class),
        ("direction", direction),
        ("session", session),
    ] {
        if value.is_empty() {
            return Err(Error::InvalidChannelFormat {
                channel: channel.to_string(),
                expected: EXPECTED_CHANNEL_FORMAT.to_string(),
                detail: Some(format!("the {component} is empty")),
            });
        }
        if value == WILDCARD {
            return Err(Error::InvalidChannelFormat {
                channel: channel.to_string(),
                expected: EXPECTED_CHANNEL_FORMAT.to_string(),
                detail: Some(format!(
                    "the {component} is '*': that is a pattern, parse it with ChannelPattern::parse"
                )),
            });
        }
    }
    Channel::new(class, direction, session)
}

fn split_canonical(text: &str) -> Result<[&str; 3]> {
    let mut parts = text.split(SEPARATOR);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(class), Some(direction), Some(session), None) => Ok([class, direction, session]),
        _ => Err(Error::InvalidChannelFormat {
            channel: text.to_string(),
            expected: EXPECTED_CHANNEL_FORMAT.to_string(),
            detail: None,
        }),
    }
}

/// A subscription pattern: each component is either fixed or a wildcard.
///
/// The text form is the canonical channel form with `*` for wildcards: `PaymentRequest:*:*`,
/// `*:request:session456`. A pattern built with [`ChannelPattern::for_message`] also carries the message
/// type's template, which backends use to name the pattern on the broker.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelPattern {
    class: Option<Box<str>>,
    direction: Option<Box<str>>,
    session: Option<Box<str>>,
    template: ChannelTemplate,
}

impl ChannelPattern {
    /// The pattern that matches every channel: `*:*:*`.
    pub fn all() -> Self {
        ChannelPattern {
            class: None,
            direction: None,
            session: None,
            template: ChannelTemplate::DEFAULT,
        }
    }

    /// Parses `class:direction:session` where any component may be `*`.
    pub fn parse(pattern: &str) -> Result<Self> {
        let parts = split_canonical(pattern)?;
        let mut fixed: [Option<Box<str>>; 3] = [None, None, None];
        for (slot, (component, value)) in ["class", "direction", "session"]
            .into_iter()
            .zip(parts)
            .enumerate()
        {
            if value == WILDCARD {
                continue;
            }
            if value.is_empty() {
                return Err(Error::InvalidChannelFormat {
                    channel: pattern.to_string(),
                    expected: "MessageClass:direction:session_id (each may be '*')".to_string(),
                    detail: Some(format!("the {component} is empty")),
                });
            }
            validate_component(component, value, None)?;
            fixed[slot] = Some(value.into());
        }
        let [class, direction, session] = fixed;
        Ok(ChannelPattern {
            class,
            direction,
            session,
            template: ChannelTemplate::DEFAULT,
        })
    }

    /// The pattern of message type `M`: its class, with the direction and session fixed when given.
    pub fn for_message<M: crate::Message>(
        direction: Option<&str>,
        session: Option<&str>,
    ) -> Result<Self> {
        Self::with_template(M::TEMPLATE, Some(M::CLASS), direction, session)
    }

    /// A pattern with explicit components (`None` is a wildcard) and template.
    pub fn with_template(
        template: ChannelTemplate,
        class: Option<&str>,
        direction: Option<&str>,
        session: Option<&str>,
    ) -> Result<Self> {
        let check = |component, value: Option<&str>, part| -> Result<Option<Box<str>>> {
            match value {
                Some(value) => {
                    validate_component(component, value, template.separator_after(part))?;
                    Ok(Some(value.into()))
                }
                None => Ok(None),
            }
        };
        Ok(ChannelPattern {
            class: check("class", class, TemplatePart::Class)?,
            direction: check("direction", direction, TemplatePart::Direction)?,
            session: check("session", session, TemplatePart::Session)?,
            template,
        })
    }

    /// The fixed class, or `None` for a wildcard.
    pub fn class(&self) -> Option<&str> {
        self.class.as_deref()
    }

    /// The fixed direction, or `None` for a wildcard.
    pub fn direction(&self) -> Option<&str> {
        self.direction.as_deref()
    }

    /// The fixed session, or `None` for a wildcard.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// The template channels matching this pattern are named with.
    pub fn template(&self) -> ChannelTemplate {
        self.template
    }

    /// Whether every component is fixed (the pattern names exactly one channel).
    pub fn is_exact(&self) -> bool {
        self.class.is_some() && self.direction.is_some() && self.session.is_some()
    }

    /// The one matcher: whether `channel` matches this pattern, component by component.
    pub fn matches(&self, channel: &Channel) -> bool {
        fn component(fixed: &Option<Box<str>>, actual: &str) -> bool {
            fixed.as_deref().is_none_or(|fixed| fixed == actual)
        }
        component(&self.class, channel.class())
            && component(&self.direction, channel.direction())
            && component(&self.session, channel.session())
    }

    /// The name of this pattern on a broker whose wildcard is `wildcard`, rendered with the template;
    /// fixed parts and literal text go through `escape`.
    pub fn render(&self, wildcard: &str, escape: impl Fn(&str) -> String) -> String {
        self.template.render_pattern(self, wildcard, escape)
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |part: &Option<Box<str>>| part.as_deref().unwrap_or(WILDCARD).to_string();
        write!(
            f,
            "{}{SEPARATOR}{}{SEPARATOR}{}",
            show(&self.class),
            show(&self.direction),
            show(&self.session)
        )
    }
}

impl fmt::Debug for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelPattern({:?}", self.to_string())?;
        if !self.template.is_default() {
            write!(f, ", template {:?}", self.template.source())?;
        }
        f.write_str(")")
    }
}

impl FromStr for ChannelPattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ChannelPattern::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOTTED: ChannelTemplate = ChannelTemplate::__from_checked_parts(
        "payments.{direction}.{session_id}",
        &[
            TemplatePart::Literal("payments."),
            TemplatePart::Direction,
            TemplatePart::Literal("."),
            TemplatePart::Session,
        ],
    );

    #[test]
    fn parse_gives_back_the_components() {
        let channel = parse_channel("PaymentRequest:request:session456").unwrap();
        assert_eq!(
            (channel.class(), channel.direction(), channel.session()),
            ("PaymentRequest", "request", "session456")
        );
        assert_eq!(channel.name(), "PaymentRequest:request:session456");
        assert_eq!(channel.to_string(), channel.canonical());
    }

    #[test]
    fn wrong_shapes_are_invalid_format() {
        for bad in ["invalid_format", "a:b", "a:b:c:d", ""] {
            let error = parse_channel(bad).unwrap_err();
            assert!(
                matches!(error, Error::InvalidChannelFormat { detail: None, .. }),
                "{bad}: {error}"
            );
            assert_eq!(
                error.to_string(),
                format!(
                    "Channel '{bad}' has invalid format. Expected: 'MessageClass:direction:session_id', got: '{bad}'"
                )
            );
        }
    }

    #[test]
    fn empty_components_are_rejected_and_named() {
        for (bad, component) in [
            (":request:s", "class"),
            ("A::s", "direction"),
            ("A:request:", "session"),
        ] {
            let error = parse_channel(bad).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains(&format!("the {component} is empty")),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn components_with_separator_or_wildcard_are_rejected() {
        let error = Channel::new("A", "request", "s:1").unwrap_err();
        assert!(matches!(
            error,
            Error::InvalidChannelComponent {
                component: "session",
                ..
            }
        ));
        assert!(
            error.to_string().contains("':' separates the components"),
            "{error}"
        );
        let error = Channel::new("A", "re*", "s").unwrap_err();
        assert!(error.to_string().contains("wildcard"), "{error}");
        let error = Channel::new("A", "request", "two words").unwrap_err();
        assert!(error.to_string().contains("' '"), "{error}");
        let error = Channel::new("A", "request", &"x".repeat(MAX_COMPONENT_LEN + 1)).unwrap_err();
        assert!(error.to_string().contains("bytes long"), "{error}");
        assert!(parse_channel("PaymentRequest:*:s").is_err());
    }

    #[test]
    fn patterns_match_component_by_component() {
        let channel = parse_channel("PaymentRequest:request:session456").unwrap();
        let other = parse_channel("PaymentResponse:response:session789").unwrap();
        let cases = [
            ("PaymentRequest:*:*", true, false),
            ("*:request:session456", true, false),
            ("*:*:*", true, true),
            ("*:*:session789", false, true),
            ("PaymentRequest:response:*", false, false),
            ("PaymentRequest:request:session456", true, false),
            ("PaymentRequestX:*:*", false, false),
        ];
        for (pattern, first, second) in cases {
            let pattern = ChannelPattern::parse(pattern).unwrap();
            assert_eq!(pattern.matches(&channel), first, "{pattern} vs {channel}");
            assert_eq!(pattern.matches(&other), second, "{pattern} vs {other}");
        }
        assert!(ChannelPattern::parse("a:b").is_err());
        assert!(ChannelPattern::parse("a::*").is_err());
        assert_eq!(ChannelPattern::parse("A:*:s").unwrap().to_string(), "A:*:s");
    }

    #[test]
    fn templates_render_split_and_forbid_their_literals() {
        let channel = Channel::with_template(&DOTTED, "PaymentRequest", "request", "s1").unwrap();
        assert_eq!(channel.name(), "payments.request.s1");
        assert_eq!(channel.canonical(), "PaymentRequest:request:s1");
        assert_eq!(
            DOTTED.split("payments.request.s1"),
            Some([None, Some("request"), Some("s1")])
        );
        assert_eq!(DOTTED.split("payments.request"), None);
        assert_eq!(DOTTED.split("other.request.s1"), None);
        let error =
            Channel::with_template(&DOTTED, "PaymentRequest", "re.quest", "s1").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("separates it from the next component"),
            "{error}"
        );
        assert!(error.to_string().contains("also forbids '.'"), "{error}");
        // The class is not in this template and the session is last, so dots there are harmless.
        let channel =
            Channel::with_template(&DOTTED, "billing.PaymentRequest", "request", "s.1").unwrap();
        assert_eq!(
            DOTTED.split(channel.name()),
            Some([None, Some("request"), Some("s.1")])
        );

        let pattern =
            ChannelPattern::with_template(DOTTED, Some("PaymentRequest"), None, Some("s1"))
                .unwrap();
        assert_eq!(pattern.render("*", |s| s.to_string()), "payments.*.s1");
        assert_eq!(
            ChannelTemplate::DEFAULT.split("A:b:c"),
            Some([Some("A"), Some("b"), Some("c")])
        );
    }

    #[test]
    fn dead_letter_channels_keep_class_and_session() {
        let channel = parse_channel("PaymentRequest:request:s1").unwrap();
        let dead = channel.dead_letter();
        assert_eq!(dead.name(), "DeadLetter:PaymentRequest:s1");
        assert!(
            ChannelPattern::parse("DeadLetter:*:*")
                .unwrap()
                .matches(&dead)
        );
        assert!(
            !ChannelPattern::parse("PaymentRequest:*:*")
                .unwrap()
                .matches(&dead)
        );
    }
}
