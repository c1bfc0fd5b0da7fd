//! The envelope every message travels in, and its wire frame.
//!
//! The frame format is specified in `docs/wire-format.md`: a MessagePack map (or, for JSON payloads, a
//! JSON object) with the keys `v`, `id`, `class`, `channel`, `direction`, `session`, `content_type`,
//! `timestamp`, `correlation_id`, `reply_to`, `attempt`, `headers` and `payload`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::channel::Channel;
use crate::codec::{BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE};
use crate::error::{Error, Result};

/// The version of the frame format this crate writes and reads.
pub const FRAME_VERSION: u32 = 1;

/// The class of the dead letter made of a frame that could not be decoded at all.
pub const MALFORMED_CLASS: &str = "agentcomm.Malformed";

/// Header names agentcomm sets. All start with `agentcomm-`; the prefix is reserved.
pub mod headers {
    /// Why a message was dead-lettered: one of the `REASON_*` values.
    pub const DEAD_LETTER_REASON: &str = "agentcomm-dead-letter-reason";
    /// The error that made the last attempt fail.
    pub const ERROR: &str = "agentcomm-error";
    /// How many attempts were made before the message was dead-lettered.
    pub const ATTEMPTS: &str = "agentcomm-attempts";
    /// The agent that dead-lettered the message.
    pub const AGENT: &str = "agentcomm-agent";
    /// The id of the message before it was dead-lettered.
    pub const ORIGINAL_ID: &str = "agentcomm-original-id";
    /// The channel the message was on before it was dead-lettered.
    pub const ORIGINAL_CHANNEL: &str = "agentcomm-original-channel";
    /// Where a malformed frame was read (a channel or a stream key).
    pub const SOURCE: &str = "agentcomm-source";
    /// Set on a message given back because publishing its dead letter failed: the reason it is to be
    /// dead-lettered with. Its next delivery is dead-lettered at once (with the `ERROR` and `ATTEMPTS`
    /// it carries), without running the handler again.
    pub const DEAD_LETTER_PENDING: &str = "agentcomm-dead-letter-pending";
    /// Set on a reply that answers a request with its failure: the agent that received the request
    /// dead-lettered it (the value is the dead letter's reason; `ERROR`, `ATTEMPTS` and `AGENT` say
    /// more), so no reply will come. Sent only by an agent that sends the reply's class (one that could
    /// have answered), not by others that merely receive the request's class. The requester's
    /// `request` returns [`Error::RequestFailed`](crate::error::Error::RequestFailed) at once instead
    /// of waiting out its timeout. The payload is empty.
    pub const REQUEST_FAILED: &str = "agentcomm-request-failed";

    /// The handler failed on every attempt.
    pub const REASON_HANDLER_FAILED: &str = "handler-failed";
    /// The handler said the failure is permanent: no retry.
    pub const REASON_REJECTED: &str = "rejected";
    /// The payload could not be decoded as the message class.
    pub const REASON_UNDECODABLE: &str = "undecodable";
    /// The message failed its validation rules.
    pub const REASON_INVALID: &str = "invalid";
    /// The agent does not declare the message class.
    pub const REASON_UNDECLARED_CLASS: &str = "undeclared-class";
    /// The frame itself could not be decoded.
    pub const REASON_MALFORMED_FRAME: &str = "malformed-frame";
}

/// A message id: a UUID, version 7 (time-ordered) when agentcomm makes it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new time-ordered id (UUID v7).
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// The milliseconds since the Unix epoch that a time-ordered (v7) id carries; `None` for other
    /// UUID versions.
    pub fn unix_ms(&self) -> Option<u64> {
        let (seconds, nanos) = self.0.get_timestamp()?.to_unix();
        Some(seconds * 1000 + u64::from(nanos) / 1_000_000)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// Parses the hyphenated form.
    pub fn parse(text: &str) -> Result<Self> {
        Uuid::try_parse(text)
            .map(MessageId)
            .map_err(|e| Error::decode("message id", format!("'{text}' is not a UUID: {e}")))
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        MessageId(uuid)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

/// String headers of an envelope.
pub type Headers = BTreeMap<String, String>;

/// A message in transit: metadata and the encoded payload.
///
/// ```
/// use agentcomm_core::channel::parse_channel;
/// use agentcomm_core::envelope::Envelope;
///
/// let channel = parse_channel("PaymentRequest:request:s1")?;
/// let envelope = Envelope::new(channel, "application/json", br#"{"amount":10.0}"#.to_vec())
///     .with_header("tenant", "acme")
///     .with_correlation_id("order-7");
/// let frame = envelope.to_frame()?;
/// let back = agentcomm_core::envelope::Envelope::from_frame(&frame)?;
/// assert_eq!(back, envelope);
/// # Ok::<(), agentcomm_core::Error>(())
/// ```
#[derive(Clone, PartialEq)]
pub struct Envelope {
    id: MessageId,
    /// The message class when it differs from the channel's class (dead letters); `None` otherwise.
    class: Option<Cow<'static, str>>,
    channel: Channel,
    content_type: Cow<'static, str>,
    timestamp_ms: u64,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    attempt: u32,
    headers: Headers,
    payload: Bytes,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Envelope {
    /// A new envelope for `channel`, with a fresh id, the current time, attempt 1, and the channel's
    /// class as the message class.
    pub fn new(
        channel: Channel,
        content_type: impl Into<Cow<'static, str>>,
        payload: impl Into<Bytes>,
    ) -> Self {
        let id = MessageId::new();
        // The id's own time (UUID v7 carries milliseconds since the epoch): one clock read, not two,
        // and the id and the timestamp always agree.
        let timestamp_ms = id.unix_ms().unwrap_or_else(now_ms);
        Envelope {
            id,
            class: None,
            channel,
            content_type: content_type.into(),
            timestamp_ms,
            correlation_id: None,
            reply_to: None,
            attempt: 1,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// A new envelope whose message class is given (a dead letter keeps the class of the message it
    /// carries while travelling on a `DeadLetter` channel).
    pub fn with_class(
        class: impl Into<Cow<'static, str>>,
        channel: Channel,
        content_type: impl Into<Cow<'static, str>>,
        payload: impl Into<Bytes>,
    ) -> Self {
        let class = class.into();
        let class = (class != channel.class()).then_some(class);
        Envelope {
            class,
            ..Self::new(channel, content_type, payload)
        }
    }

    /// The dead letter of a frame that could not be decoded: the raw bytes as payload, the reason in
    /// headers, on `DeadLetter:agentcomm.Malformed:unknown`. Backends publish it when a frame is unreadable.
    pub fn malformed(raw: impl Into<Bytes>, source: &str, error: &str) -> Self {
        let channel = Channel::new(MALFORMED_CLASS, "frame", "unknown")
            .expect("the malformed channel is valid")
            .dead_letter();
        Envelope::with_class(MALFORMED_CLASS, channel, BINARY_CONTENT_TYPE, raw)
            .with_header(headers::DEAD_LETTER_REASON, headers::REASON_MALFORMED_FRAME)
            .with_header(headers::ERROR, error)
            .with_header(headers::SOURCE, source)
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The message class of the payload.
    pub fn class(&self) -> &str {
        self.class
            .as_deref()
            .unwrap_or_else(|| self.channel.class())
    }

    /// The channel the message is published on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The session of the channel.
    pub fn session(&self) -> &str {
        self.channel.session()
    }

    /// The content type of the payload (`application/msgpack`, `application/json`, ...).
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// When the message was first published, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The id of the message this one answers or belongs with.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// Whether this is a reply on its way to a requester's inbox, answering a request: direction
    /// `reply`, a session beginning with `inbox-`, and a correlation id.
    pub(crate) fn is_inbox_reply(&self) -> bool {
        crate::channel::is_inbox(self.channel()) && self.correlation_id().is_some()
    }

    /// Where a reply should go: a channel in canonical form.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// Which delivery attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// One header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The headers, to change.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The encoded payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets the timestamp.
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets where replies go (a channel in canonical form).
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }

    /// Relabels the payload (its bytes unchanged).
    pub(crate) fn with_content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = Cow::Borrowed(content_type);
        self
    }

    /// Sets the attempt number (from 1).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Moves the envelope to another channel (used for dead letters); the message class stays.
    pub fn with_channel(mut self, channel: Channel) -> Self {
        if self.class.is_none() && channel.class() != self.channel.class() {
            self.class = Some(Cow::Owned(self.channel.class().to_string()));
        } else if self.class.as_deref() == Some(channel.class()) {
            self.class = None;
        }
        self.channel = channel;
        self
    }

    /// The same message, as the next delivery attempt.
    pub fn next_attempt(&self) -> Self {
        let mut next = self.clone();
        next.attempt = self.attempt.saturating_add(1);
        next
    }

    /// Encodes the envelope as a wire frame: a MessagePack map, or a JSON object when the payload is JSON.
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        self.encode_frame(None::<(&str, fn() -> &'static str)>)
    }

    /// Encodes the envelope as [`to_frame`](Self::to_frame) does, with one more header (`name` set to
    /// `value`, replacing a header of that name), without changing the envelope: for a backend's own
    /// per-publish header, written straight into the frame.
    ///
    /// ```
    /// use agentcomm_core::{Envelope, parse_channel};
    ///
    /// let envelope = Envelope::new(parse_channel("A:request:s1")?, "application/msgpack", vec![0x80]);
    /// let frame = envelope.to_frame_with_header("x-trace", "abc")?;
    /// assert_eq!(Envelope::from_frame(&frame)?.headers().get("x-trace").map(String::as_str), Some("abc"));
    /// assert!(envelope.headers().is_empty());
    /// # Ok::<(), agentcomm_core::Error>(())
    /// ```
    pub fn to_frame_with_header(&self, name: &str, value: &str) -> Result<Vec<u8>> {
        self.to_frame_with_header_from(name, || value)
    }

    /// Encodes the envelope as [`to_frame_with_header`](Self::to_frame_with_header) does, with the
    /// header's value made by `value` only once the envelope is known to encode: a value that must
    /// not be used up by a message that is never sent (a publisher's next sequence number) is not
    /// taken for one whose payload is refused.
    ///
    /// ```
    /// use agentcomm_core::{Envelope, parse_channel};
    ///
    /// let broken = Envelope::new(parse_channel("A:request:s1")?, "application/json", b"{".to_vec());
    /// let mut taken = false;
    /// assert!(broken.to_frame_with_header_from("x-seq", || { taken = true; "1" }).is_err());
    /// assert!(!taken);
    /// # Ok::<(), agentcomm_core::Error>(())
    /// ```
    pub fn to_frame_with_header_from<V: AsRef<str>>(
        &self,
        name: &str,
        value: impl FnOnce() -> V,
    ) -> Result<Vec<u8>> {
        self.encode_frame(Some((name, value)))
    }

    fn encode_frame<V: AsRef<str>>(
        &self,
        extra: Option<(&str, impl FnOnce() -> V)>,
    ) -> Result<Vec<u8>> {
        // Everything that can refuse the envelope comes before `extra`'s value is made.
        if self.content_type == JSON_CONTENT_TYPE {
            let text = std::str::from_utf8(&self.payload).map_err(|e| {
                Error::encode("envelope", format!("the JSON payload is not UTF-8: {e}"))
            })?;
            let payload: &serde_json::value::RawValue =
                serde_json::from_str(text).map_err(|e| {
                    Error::encode(
                        "envelope",
                        format!("the JSON payload is not valid JSON: {e}"),
                    )
                })?;
            let extra = extra.map(|(name, value)| (name, value()));
            let mut wire = self.wire(payload, true);
            if let Some((name, value)) = &extra {
                wire.headers.retain(|(existing, _)| existing != name);
                wire.headers
                    .push((Cow::Borrowed(*name), Cow::Borrowed(value.as_ref())));
                wire.headers.sort();
            }
            serde_json::to_vec(&wire).map_err(|e| Error::encode("envelope", e))
        } else {
            let extra = extra.map(|(name, value)| (name, value()));
            let extra = extra.as_ref().map(|(name, value)| (*name, value.as_ref()));
            let wire = self.wire(&self.payload[..], false);
            let channel = self.class.is_none().then_some(&self.channel);
            let bound = crate::frame_msgpack::len_bound(&wire, channel, &self.headers, extra);
            let mut buffer = Vec::with_capacity(bound);
            crate::frame_msgpack::write(&wire, channel, &self.headers, extra, &mut buffer);
            Ok(buffer)
        }
    }

    /// Decodes a wire frame (either form; a JSON frame starts with `{`). The payload is copied out.
    pub fn from_frame(frame: &[u8]) -> Result<Self> {
        Self::decode_frame(frame, Bytes::copy_from_slice, None, None).map(|(envelope, _)| envelope)
    }

    /// Decodes a wire frame held in `Bytes`: the payload is a view into the frame, not a copy.
    pub fn from_frame_bytes(frame: Bytes) -> Result<Self> {
        Self::decode_frame(&frame, |payload| frame.slice_ref(payload), None, None)
            .map(|(envelope, _)| envelope)
    }

    /// Decodes `frame`. A channel equal to `reuse` (same name and components) is `reuse` itself, not a
    /// new one; the header named `take`, when there is one, is returned apart instead of kept.
    fn decode_frame(
        frame: &[u8],
        payload_of: impl Fn(&[u8]) -> Bytes,
        reuse: Option<&Channel>,
        take: Option<&str>,
    ) -> Result<(Self, Option<String>)> {
        let first = frame.iter().copied().find(|b| !b.is_ascii_whitespace());
        if first == Some(b'{') {
            let wire: Wire<'_, &serde_json::value::RawValue> =
                serde_json::from_slice(frame).map_err(|e| Error::decode("envelope", e))?;
            let payload = payload_of(wire.payload.get().as_bytes());
            Self::from_wire(wire, payload, reuse, take)
        } else {
            let (wire, taken) = crate::frame_msgpack::read(frame, reuse, take)
                .map_err(|e| Error::decode("envelope", e))?;
            let payload = payload_of(wire.payload);
            // The taken header is not among the wire's headers: `from_wire` finds none to take.
            let (envelope, _) = Self::from_wire(wire, payload, reuse, None)?;
            Ok((envelope, taken.map(str::to_owned)))
        }
    }

    /// The frame's fields; `headers` false leaves the headers out (the MessagePack writer takes them
    /// from the envelope itself, without building a list).
    fn wire<P>(&self, payload: P, headers: bool) -> Wire<'_, P> {
        Wire {
            v: FRAME_VERSION,
            id: WireId::Id(self.id),
            class: Cow::Borrowed(self.class()),
            channel: Cow::Borrowed(self.channel.name()),
            direction: Cow::Borrowed(self.channel.direction()),
            session: Cow::Borrowed(self.channel.session()),
            channel_class: self
                .class
                .is_some()
                .then(|| Cow::Borrowed(self.channel.class())),
            content_type: Cow::Borrowed(&self.content_type),
            timestamp: self.timestamp_ms,
            correlation_id: self.correlation_id.as_deref().map(Cow::Borrowed),
            reply_to: self.reply_to.as_deref().map(Cow::Borrowed),
            attempt: self.attempt,
            headers: if headers {
                self.headers
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                    .collect()
            } else {
                Vec::new()
            },
            payload,
        }
    }

    fn from_wire<P>(
        header: Wire<'_, P>,
        payload: Bytes,
        reuse: Option<&Channel>,
        take: Option<&str>,
    ) -> Result<(Self, Option<String>)> {
        if header.v != FRAME_VERSION {
            return Err(Error::decode(
                "envelope",
                format!(
                    "frame version {} is not supported (this build reads version {FRAME_VERSION}); upgrade agentcomm",
                    header.v
                ),
            ));
        }
        let id = match header.id {
            WireId::Id(id) => id,
            WireId::Text(text) => MessageId::parse(&text)?,
        };
        let channel_class = header.channel_class.as_deref().unwrap_or(&header.class);
        let channel = match reuse {
            // Most frames come on the channel of the one before: the same strings make the same channel.
            Some(channel)
                if same(channel.name(), &header.channel)
                    && same(channel.class(), channel_class)
                    && same(channel.direction(), &header.direction)
                    && same(channel.session(), &header.session) =>
            {
                channel.clone()
            }
            _ => Channel::from_wire(
                channel_class,
                &header.direction,
                &header.session,
                &header.channel,
            )
            .map_err(|e| Error::decode("envelope", format!("invalid channel: {e}")))?,
        };
        if header.attempt == 0 {
            return Err(Error::decode(
                "envelope",
                "attempt is 0; attempts count from 1",
            ));
        }
        let mut taken = None;
        let mut headers = Headers::new();
        for (name, value) in header.headers {
            if take.is_some_and(|take| take == name) {
                taken = Some(value.into_owned());
            } else {
                headers.insert(name.into_owned(), value.into_owned());
            }
        }
        let envelope = Envelope {
            id,
            class: (header.class != channel.class()).then(|| Cow::Owned(header.class.into_owned())),
            channel,
            content_type: known_content_type(&header.content_type).map_or_else(
                || Cow::Owned(header.content_type.into_owned()),
                Cow::Borrowed,
            ),
            timestamp_ms: header.timestamp,
            correlation_id: header.correlation_id.map(Cow::into_owned),
            reply_to: header.reply_to.map(Cow::into_owned),
            attempt: header.attempt,
            headers,
            payload,
        };
        Ok((envelope, taken))
    }
}

/// Decodes frame after frame of one source (a subscription, a consumer), reusing what frames share: a
/// frame on the same channel as the one before gets that channel, not a new copy of it.
///
/// ```
/// use agentcomm_core::envelope::FrameDecoder;
/// use agentcomm_core::{Envelope, parse_channel};
///
/// let sent = Envelope::new(parse_channel("A:request:s1")?, "application/msgpack", vec![0x80]);
/// let frame = bytes::Bytes::from(sent.to_frame_with_header("x-seq", "7")?);
/// let mut decoder = FrameDecoder::new();
/// let (received, seq) = decoder.decode_taking(frame, "x-seq")?;
/// assert_eq!((received.id(), seq.as_deref()), (sent.id(), Some("7")));
/// assert!(received.headers().is_empty());
/// # Ok::<(), agentcomm_core::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    last_channel: Option<Channel>,
}

impl FrameDecoder {
    /// A decoder that has seen nothing yet.
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Decodes `frame` as [`Envelope::from_frame_bytes`] does.
    pub fn decode(&mut self, frame: Bytes) -> Result<Envelope> {
        self.decode_with(frame, None).map(|(envelope, _)| envelope)
    }

    /// Decodes `frame`, and returns the header named `header` apart: it is not among the envelope's
    /// headers. For a backend's own header that the handler must not see. When the frame repeats the
    /// header, the last value counts, as it does for the envelope's headers.
    pub fn decode_taking(
        &mut self,
        frame: Bytes,
        header: &str,
    ) -> Result<(Envelope, Option<String>)> {
        self.decode_with(frame, Some(header))
    }

    fn decode_with(
        &mut self,
        frame: Bytes,
        take: Option<&str>,
    ) -> Result<(Envelope, Option<String>)> {
        let decoded = Envelope::decode_frame(
            &frame,
            |payload| frame.slice_ref(payload),
            self.last_channel.as_ref(),
            take,
        )?;
        self.last_channel = Some(decoded.0.channel().clone());
        Ok(decoded)
    }
}

/// Whether two strings are equal; at once when they are the same string (the MessagePack reader
/// hands out the reused channel's own components when a frame's are equal to them).
fn same(a: &str, b: &str) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

/// The content types agentcomm writes: an envelope keeps them as `&'static str`, not a copy.
pub(crate) const KNOWN_CONTENT_TYPES: [&str; 3] = [
    crate::codec::MSGPACK_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    BINARY_CONTENT_TYPE,
];

fn known_content_type(content_type: &str) -> Option<&'static str> {
    KNOWN_CONTENT_TYPES
        .into_iter()
        .find(|known| *known == content_type)
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("class", &self.class())
            .field("channel", &self.channel)
            .field("content_type", &self.content_type)
            .field("timestamp_ms", &self.timestamp_ms)
            .field("correlation_id", &self.correlation_id)
            .field("reply_to", &self.reply_to)
            .field("attempt", &self.attempt)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

fn one() -> u32 {
    1
}

/// Whether a `v` or `attempt` holds its default, for serde (which passes a reference).
fn is_one(value: &u32) -> bool {
    *value == 1
}

/// The frame: every field in one flat map, the payload last. `v`, `attempt` and `headers` are left out
/// when they hold their defaults.
#[derive(Serialize, Deserialize)]
pub(crate) struct Wire<'a, P> {
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub(crate) v: u32,
    pub(crate) id: WireId<'a>,
    #[serde(borrow)]
    pub(crate) class: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) channel: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) direction: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) session: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) channel_class: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) content_type: Cow<'a, str>,
    pub(crate) timestamp: u64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) reply_to: Option<Cow<'a, str>>,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub(crate) attempt: u32,
    #[serde(
        borrow,
        default,
        with = "wire_headers",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) headers: WireHeaders<'a>,
    pub(crate) payload: P,
}

/// The headers of a frame in the order they came: a map on the wire, a list here, so that reading a
/// frame builds one map (the envelope's), not two.
pub(crate) type WireHeaders<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// Serde for [`WireHeaders`] as a map of string to string.
mod wire_headers {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{MapAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::WireHeaders;

    pub(super) fn serialize<S: Serializer>(
        headers: &WireHeaders<'_>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(headers.iter().map(|(name, value)| (name, value)))
    }

    pub(super) fn deserialize<'de, 'a, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<WireHeaders<'a>, D::Error> {
        struct Headers;
        impl<'de> Visitor<'de> for Headers {
            type Value = WireHeaders<'static>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of string to string")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut headers = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    headers.push((Cow::Owned(name), Cow::Owned(value)));
                }
                Ok(headers)
            }
        }
        deserializer.deserialize_map(Headers)
    }
}

/// The id as text on the wire.
pub(crate) enum WireId<'a> {
    Id(MessageId),
    Text(Cow<'a, str>),
}

impl Serialize for WireId<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            WireId::Id(id) => {
                serializer.serialize_str(id.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
            WireId::Text(text) => serializer.serialize_str(text),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for WireId<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Cow::<'a, str>::deserialize(deserializer).map(WireId::Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes written as MessagePack `bin`.
    pub(crate) struct Bin<'a>(Cow<'a, [u8]>);

    impl Serialize for Bin<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Bin<'a> {
        fn deserialize<D: Deserializer<'de>>(
            deserializer: D,
        ) -> std::result::Result<Self, D::Error> {
            serde_bytes::deserialize::<Cow<'a, [u8]>, D>(deserializer).map(Bin)
        }
    }

    /// The frame as `rmp_serde` writes the frame struct in map form: the reference the hand-written
    /// codec must match.
    fn serde_frame(envelope: &Envelope) -> Vec<u8> {
        let mut buffer = Vec::new();
        envelope
            .wire(Bin(Cow::Borrowed(&envelope.payload()[..])), true)
            .serialize(&mut rmp_serde::Serializer::new(&mut buffer).with_struct_map())
            .unwrap();
        buffer
    }

    #[test]
    fn a_new_envelope_is_stamped_with_the_time_its_id_carries() {
        let before = now_ms();
        let envelope = Envelope::new(
            parse_channel("A:b:c").unwrap(),
            MSGPACK_CONTENT_TYPE,
            Vec::new(),
        );
        let after = now_ms();
        assert_eq!(Some(envelope.timestamp_ms()), envelope.id().unix_ms());
        // v7 ids may run a millisecond ahead when many are made within one.
        assert!(
            (before..=after + 1).contains(&envelope.timestamp_ms()),
            "{before} <= {} <= {after} + 1",
            envelope.timestamp_ms()
        );
        let v4 = MessageId::from(Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef));
        assert_eq!(v4.unix_ms(), None);
    }

    #[test]
    fn the_hand_written_codec_matches_rmp_serde_both_ways() {
        let envelopes = [
            sample(MSGPACK_CONTENT_TYPE, b"\x81\xa1a\x01"),
            Envelope::new(
                parse_channel("A:b:c").unwrap(),
                MSGPACK_CONTENT_TYPE,
                vec![7u8; 70_000],
            )
            .with_attempt(300)
            .with_timestamp_ms(u64::MAX),
            sample(MSGPACK_CONTENT_TYPE, b"")
                .with_channel(parse_channel("X:y:z").unwrap().dead_letter()),
        ];
        for envelope in envelopes {
            let ours = envelope.to_frame().unwrap();
            assert_eq!(
                ours,
                serde_frame(&envelope),
                "byte for byte what rmp_serde writes"
            );
            let by_serde: Wire<'_, Bin<'_>> = rmp_serde::from_slice(&ours).unwrap();
            assert_eq!(by_serde.payload.0.len(), envelope.payload().len());
            assert_eq!(
                Envelope::from_frame(&serde_frame(&envelope)).unwrap(),
                envelope
            );
        }
    }

    #[test]
    fn fields_holding_their_defaults_are_left_out_and_read_back() {
        fn keys(frame: &[u8]) -> Vec<String> {
            let map: std::collections::BTreeMap<String, serde::de::IgnoredAny> = match frame.first()
            {
                Some(b'{') => serde_json::from_slice(frame).unwrap(),
                _ => rmp_serde::from_slice(frame).unwrap(),
            };
            map.into_keys().collect()
        }
        let required = [
            "channel",
            "class",
            "content_type",
            "direction",
            "id",
            "payload",
            "session",
            "timestamp",
        ];
        let first = Envelope::new(
            parse_channel("PaymentRequest:request:s1").unwrap(),
            MSGPACK_CONTENT_TYPE,
            b"\x80".as_slice(),
        );
        let json = Envelope::new(first.channel().clone(), JSON_CONTENT_TYPE, b"{}".as_slice());
        for envelope in [&first, &json] {
            let frame = envelope.to_frame().unwrap();
            assert_eq!(keys(&frame), required, "no v, attempt or headers");
            let read = Envelope::from_frame(&frame).unwrap();
            assert_eq!((read.attempt(), read.headers().len()), (1, 0));
            assert_eq!(&read, envelope);

            let retried = envelope
                .clone()
                .with_attempt(2)
                .with_header("tenant", "acme");
            let frame = retried.to_frame().unwrap();
            let mut expected = required.to_vec();
            expected.extend(["attempt", "headers"]);
            expected.sort();
            assert_eq!(keys(&frame), expected);
            assert_eq!(Envelope::from_frame(&frame).unwrap(), retried);
        }
        // A header added while writing (the Redis backend's sequence number) brings `headers` back.
        let frame = first.to_frame_with_header("agentcomm-seq", "p/1").unwrap();
        assert!(keys(&frame).contains(&"headers".to_string()));
    }

    #[test]
    fn unknown_fields_of_newer_writers_are_skipped() {
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x80");
        let frame = envelope.to_frame().unwrap();
        // Add four fields: a nested map with an array, a float, an ext value and a nil.
        let fields = frame[0] & 0x0f;
        assert!(
            frame[0] & 0xf0 == 0x80 && fields + 4 > 15,
            "a fixmap that needs map16 once extended"
        );
        let mut extended = vec![0xde, 0, fields + 4];
        extended.extend_from_slice(&frame[1..]);
        extended.extend_from_slice(b"\xa4none\xc0");
        extended.extend_from_slice(b"\xa5extra\x81\xa1k\x93\x01\xcb\x3f\xf0\0\0\0\0\0\0\xc0");
        extended.extend_from_slice(b"\xa5float\xca\x3f\x80\0\0");
        extended.extend_from_slice(b"\xa3ext\xd6\x05\x01\x02\x03\x04");
        assert_eq!(Envelope::from_frame(&extended).unwrap(), envelope);
    }

    #[test]
    fn truncated_deep_or_random_frames_are_errors_not_panics() {
        let frame = sample(MSGPACK_CONTENT_TYPE, b"\x81\xa1a\x01")
            .to_frame()
            .unwrap();
        for cut in 0..frame.len() {
            assert!(Envelope::from_frame(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut deep = vec![0x81, 0xa1, b'x'];
        deep.extend(std::iter::repeat_n(0x91u8, 10_000));
        deep.push(0xc0);
        let error = Envelope::from_frame(&deep).unwrap_err();
        assert!(error.to_string().contains("nested deeper"), "{error}");
        // A cheap generator is enough to shake out panics on arbitrary input.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = Envelope::from_frame(&bytes);
            let mut mutated = frame.clone();
            let at = (state as usize) % mutated.len();
            mutated[at] ^= (state >> 8) as u8 | 1;
            let _ = Envelope::from_frame(&mutated);
        }
    }
    use crate::channel::parse_channel;
    use crate::codec::MSGPACK_CONTENT_TYPE;

    fn sample(content_type: &'static str, payload: &'static [u8]) -> Envelope {
        Envelope::new(
            parse_channel("PaymentRequest:request:s1").unwrap(),
            content_type,
            payload,
        )
        .with_correlation_id("corr-1")
        .with_reply_to("PaymentResponse:reply:inbox-1")
        .with_attempt(3)
        .with_header("tenant", "acme")
        .with_header("trace", "é \"quoted\"\n")
    }

    #[test]
    fn msgpack_frames_round_trip_every_field() {
        let envelope = sample(
            MSGPACK_CONTENT_TYPE,
            b"\x81\xa6amount\xcb\x40\x24\x00\x00\x00\x00\x00\x00",
        );
        let back = Envelope::from_frame(&envelope.to_frame().unwrap()).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.attempt(), 3);
        assert_eq!(back.header("trace"), Some("é \"quoted\"\n"));
    }

    #[test]
    fn frames_in_bytes_are_read_without_copying_the_payload() {
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x81\xa1a\x01");
        let frame = Bytes::from(envelope.to_frame().unwrap());
        let back = Envelope::from_frame_bytes(frame.clone()).unwrap();
        assert_eq!(back, envelope);
        let inside = frame.as_ptr_range();
        assert!(
            inside.contains(&back.payload().as_ptr()),
            "the payload is a view into the frame"
        );

        let json = sample(JSON_CONTENT_TYPE, br#"{"a":1}"#);
        let back = Envelope::from_frame_bytes(Bytes::from(json.to_frame().unwrap())).unwrap();
        assert_eq!(back, json);
    }

    #[test]
    fn json_frames_carry_the_payload_inline() {
        let envelope = sample(JSON_CONTENT_TYPE, br#"{"amount":10.0,"user_id":"u1"}"#);
        let frame = envelope.to_frame().unwrap();
        let value: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(value["payload"]["user_id"], "u1");
        assert_eq!(value["class"], "PaymentRequest");
        assert_eq!(value["session"], "s1");
        assert_eq!(Envelope::from_frame(&frame).unwrap(), envelope);
    }

    #[test]
    fn dead_letters_keep_the_message_class_off_their_channel() {
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x80");
        let dead = envelope
            .clone()
            .with_channel(envelope.channel().dead_letter());
        let back = Envelope::from_frame(&dead.to_frame().unwrap()).unwrap();
        assert_eq!(back.class(), "PaymentRequest");
        assert_eq!(back.channel().class(), "DeadLetter");
        assert_eq!(back.channel().name(), "DeadLetter:PaymentRequest:s1");
    }

    #[test]
    fn frames_from_other_writers_are_read_and_garbage_is_refused() {
        let foreign = br#"{"id":"0192f5e4-8a3b-7c4d-9e5f-0a1b2c3d4e5f","class":"Ping","channel":"Ping:event:s9",
            "direction":"event","session":"s9","content_type":"application/json","timestamp":1,"payload":{}}"#;
        let envelope = Envelope::from_frame(foreign).unwrap();
        assert_eq!((envelope.attempt(), envelope.session()), (1, "s9"));
        assert!(envelope.headers().is_empty());

        for garbage in [&b"\xc1\xc1"[..], b"{not json", b"", br#"{"id":"x"}"#] {
            let error = Envelope::from_frame(garbage).unwrap_err();
            assert!(
                error.to_string().starts_with("could not decode envelope"),
                "{error}"
            );
        }
        let bad_session = br#"{"id":"0192f5e4-8a3b-7c4d-9e5f-0a1b2c3d4e5f","class":"Ping","channel":"x",
            "direction":"event","session":"a:b","content_type":"application/json","timestamp":1,"payload":{}}"#;
        assert!(
            Envelope::from_frame(bad_session)
                .unwrap_err()
                .to_string()
                .contains("invalid channel")
        );
    }

    #[test]
    fn message_ids_are_time_ordered() {
        let first = MessageId::new();
        let second = MessageId::new();
        assert!(first < second);
        assert_eq!(first.as_uuid().get_version_num(), 7);
        assert_eq!(MessageId::parse(&first.to_string()).unwrap(), first);
    }

    #[test]
    fn a_header_written_into_the_frame_reads_back_like_one_set_on_the_envelope() {
        for content_type in [MSGPACK_CONTENT_TYPE, JSON_CONTENT_TYPE] {
            let payload: &'static [u8] = if content_type == JSON_CONTENT_TYPE {
                b"{\"a\":1}"
            } else {
                b"\x81\xa1a\x01"
            };
            let envelope = sample(content_type, payload);
            // A new header, and one that replaces the envelope's own of that name.
            for (name, value) in [("agentcomm-seq", "p/41"), ("tenant", "other")] {
                let frame = envelope.to_frame_with_header(name, value).unwrap();
                let expected = envelope.clone().with_header(name, value);
                // (Not byte for byte: the extra header comes last, and key order is free.)
                assert_eq!(
                    Envelope::from_frame(&frame).unwrap(),
                    expected,
                    "{content_type}"
                );
            }
            assert_eq!(
                envelope.headers().len(),
                2,
                "the envelope itself is unchanged"
            );
        }
    }

    #[test]
    fn the_frame_decoder_takes_one_header_apart_and_keeps_the_others() {
        let mut decoder = FrameDecoder::new();
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x80");
        let frame = Bytes::from(
            envelope
                .to_frame_with_header("agentcomm-seq", "p/7")
                .unwrap(),
        );
        let (decoded, taken) = decoder
            .decode_taking(frame.clone(), "agentcomm-seq")
            .unwrap();
        assert_eq!(taken.as_deref(), Some("p/7"));
        assert_eq!(decoded, envelope);
        let (decoded, taken) = decoder.decode_taking(frame.clone(), "absent").unwrap();
        assert_eq!(taken, None);
        assert_eq!(
            decoded.headers().get("agentcomm-seq").map(String::as_str),
            Some("p/7")
        );
        assert_eq!(decoder.decode(frame).unwrap(), decoded);
        // JSON frames too.
        let json = sample(JSON_CONTENT_TYPE, b"{\"a\":1}");
        let frame = Bytes::from(json.to_frame_with_header("agentcomm-seq", "p/8").unwrap());
        let (decoded, taken) = decoder.decode_taking(frame, "agentcomm-seq").unwrap();
        assert_eq!((decoded, taken.as_deref()), (json, Some("p/8")));
        // A header repeated in the frame (another writer's): the last value counts, taken or kept.
        let twice = Bytes::from_static(
            br#"{"id":"0192f5e4-8a3b-7c4d-9e5f-0a1b2c3d4e5f","class":"Ping","channel":"Ping:event:s9",
            "direction":"event","session":"s9","content_type":"application/json","timestamp":1,
            "headers":{"x":"1","y":"kept","x":"2"},"payload":{}}"#,
        );
        let (decoded, taken) = decoder.decode_taking(twice.clone(), "x").unwrap();
        assert_eq!(taken.as_deref(), Some("2"));
        assert_eq!(decoded.headers().len(), 1);
        let decoded = decoder.decode(twice).unwrap();
        assert_eq!(decoded.headers().get("x").map(String::as_str), Some("2"));
        assert_eq!(decoded.headers().get("y").map(String::as_str), Some("kept"));
    }

    #[test]
    fn a_frame_whose_only_header_is_taken_is_read_without_a_list_of_headers() {
        let envelope = Envelope::new(
            parse_channel("PaymentRequest:request:s1").unwrap(),
            MSGPACK_CONTENT_TYPE,
            b"\x80".as_slice(),
        );
        let frame = envelope
            .to_frame_with_header("agentcomm-seq", "p/7")
            .unwrap();
        let (wire, taken) =
            crate::frame_msgpack::read(&frame, None, Some("agentcomm-seq")).unwrap();
        assert_eq!(taken, Some("p/7"));
        assert_eq!(
            wire.headers.capacity(),
            0,
            "no list allocated for no header"
        );
        // Not taken: an ordinary header.
        let (wire, taken) = crate::frame_msgpack::read(&frame, None, Some("other")).unwrap();
        assert_eq!(taken, None);
        assert_eq!(wire.headers.len(), 1);
        // With other headers: those are kept, the taken one is not among them.
        let frame = sample(MSGPACK_CONTENT_TYPE, b"\x80")
            .to_frame_with_header("agentcomm-seq", "p/8")
            .unwrap();
        let (wire, taken) =
            crate::frame_msgpack::read(&frame, None, Some("agentcomm-seq")).unwrap();
        assert_eq!(taken, Some("p/8"));
        assert_eq!(wire.headers.len(), 2);
    }

    #[test]
    fn the_frame_decoder_reuses_a_channel_only_when_every_component_is_the_same() {
        // Channels that differ from the first in one part each: with one name on the broker (a
        // template that leaves a component out) and a session, a direction or a class of their own;
        // with another name only; and a dead letter, whose channel class differs from its class.
        let first = Channel::from_wire("A", "b", "s1", "shared-name").unwrap();
        let others = [
            Channel::from_wire("A", "b", "s2", "shared-name").unwrap(),
            Channel::from_wire("A", "c", "s1", "shared-name").unwrap(),
            Channel::from_wire("B", "b", "s1", "shared-name").unwrap(),
            Channel::from_wire("A", "b", "s1", "other-name").unwrap(),
            first.dead_letter(),
        ];
        let mut sequence = vec![first.clone()];
        for other in &others {
            sequence.extend([other.clone(), other.clone(), first.clone()]);
        }
        let mut decoder = FrameDecoder::new();
        for content_type in [MSGPACK_CONTENT_TYPE, JSON_CONTENT_TYPE] {
            let payload: &'static [u8] = if content_type == JSON_CONTENT_TYPE {
                b"{}"
            } else {
                b"\x80"
            };
            for channel in &sequence {
                let envelope = sample(content_type, payload).with_channel(channel.clone());
                let decoded = decoder
                    .decode(Bytes::from(envelope.to_frame().unwrap()))
                    .unwrap();
                assert_eq!(decoded.channel(), channel, "{content_type}");
                assert_eq!(decoded.class(), envelope.class(), "{content_type}");
                assert_eq!(decoded, envelope, "{content_type}");
            }
        }
        // A frame that fails leaves the decoder usable.
        assert!(decoder.decode(Bytes::from_static(b"\x81")).is_err());
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x80");
        assert_eq!(
            decoder
                .decode(Bytes::from(envelope.to_frame().unwrap()))
                .unwrap(),
            envelope
        );
    }

    #[test]
    fn the_frame_decoder_still_checks_strings_that_differ_from_the_channel_before() {
        let channel = Channel::from_wire("A", "b", "s1", "A:b:s1").unwrap();
        let envelope = sample(MSGPACK_CONTENT_TYPE, b"\x80").with_channel(channel);
        let frame = envelope.to_frame().unwrap();
        let patched = |from: &[u8], to: &[u8]| {
            let at = frame
                .windows(from.len())
                .position(|window| window == from)
                .expect("the bytes to patch");
            let mut patched = frame.clone();
            patched[at..at + to.len()].copy_from_slice(to);
            Bytes::from(patched)
        };
        let mut decoder = FrameDecoder::new();
        assert_eq!(
            decoder.decode(Bytes::from(frame.clone())).unwrap(),
            envelope
        );
        // The channel before is A:b:s1: a session of the same length that is not UTF-8 is refused.
        let error = decoder
            .decode(patched(b"\xa7session\xa2s1", b"\xa7session\xa2\xff1"))
            .unwrap_err();
        assert!(error.to_string().contains("not UTF-8"), "{error}");
        // An id that is not a UUID is refused, named.
        let id = envelope.id().to_string();
        let mut bad_id = id.clone().into_bytes();
        bad_id[0] = b'g';
        let error = decoder.decode(patched(id.as_bytes(), &bad_id)).unwrap_err();
        assert!(error.to_string().contains("is not a UUID"), "{error}");
        assert!(
            error
                .to_string()
                .contains(&String::from_utf8(bad_id).unwrap()),
            "{error}"
        );
        // A content type agentcomm does not know is kept as written.
        let custom = sample("application/x-custom", b"\x80");
        let decoded = decoder
            .decode(Bytes::from(custom.to_frame().unwrap()))
            .unwrap();
        assert_eq!(decoded.content_type(), "application/x-custom");
        assert_eq!(decoded, custom);
    }

    /// A MessagePack frame is written into one allocation of `len_bound`'s size, never grown (growing
    /// copied the frame once more per message), and a few bytes larger than the frame (a buffer of
    /// exactly the frame's length is held differently by `Bytes`, which then allocates again on its
    /// first clone, in fred).
    #[test]
    fn a_messagepack_frame_is_written_into_one_allocation_a_little_larger_than_it() {
        let channel = parse_channel("PaymentRequest:request:session-1").unwrap();
        let cases = [
            Envelope::new(channel.clone(), MSGPACK_CONTENT_TYPE, vec![7u8; 59]),
            Envelope::new(channel.clone(), MSGPACK_CONTENT_TYPE, vec![0u8; 70_000])
                .with_attempt(u32::MAX)
                .with_correlation_id("c".repeat(300))
                .with_reply_to("PaymentResponse:reply:inbox-1"),
            Envelope::with_class("Other", channel.clone(), "application/x-custom", vec![1, 2])
                .with_header("a", "b")
                .with_header("long", "x".repeat(70_000))
                .with_id(MessageId::new()),
        ];
        let sequence = "0123456789abcdef0123456789abcdef/18446744073709551615";
        for envelope in &cases {
            for extra in [
                None,
                Some(("agentcomm-seq", sequence)),
                Some(("a", "replaced")),
            ] {
                let frame = match extra {
                    None => envelope.to_frame().unwrap(),
                    Some((name, value)) => envelope
                        .to_frame_with_header_from(name, || value.to_string())
                        .unwrap(),
                };
                let bound = crate::frame_msgpack::len_bound(
                    &envelope.wire(&envelope.payload[..], false),
                    envelope.class.is_none().then_some(&envelope.channel),
                    &envelope.headers,
                    extra,
                );
                assert_eq!(frame.capacity(), bound, "the buffer grew");
                assert!(frame.len() < bound, "{} of {bound}", frame.len());
                assert_eq!(Envelope::from_frame(&frame).unwrap().id(), envelope.id());
            }
        }
    }
}
