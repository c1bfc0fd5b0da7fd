//! The MessagePack form of a frame, written and read by hand: the frame's fields are known, so a
//! direct writer and reader skip serde's per-field dispatch (the frame decode was most of the cost of
//! an envelope round trip). The format is exactly what `rmp_serde` writes for the frame struct in map
//! form; the tests in `envelope.rs` check both directions against `rmp_serde`.

use std::borrow::Cow;

use super::channel::Channel;
use super::envelope::{Headers, KNOWN_CONTENT_TYPES, MessageId, Wire, WireId};

/// The `class`, `channel`, `direction` and `session` fields of a frame on `channel` for a message of
/// its class, in the writer's order.
pub(crate) fn channel_fields(channel: &Channel) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.name().len() + 2 * channel.class().len());
    write_channel_fields(
        &mut out,
        [
            channel.class(),
            channel.name(),
            channel.direction(),
            channel.session(),
        ],
    );
    out
}

/// Writes the `class`, `channel`, `direction` and `session` fields, in that order.
fn write_channel_fields(out: &mut Vec<u8>, values: [&str; 4]) {
    for (key, value) in ["class", "channel", "direction", "session"]
        .into_iter()
        .zip(values)
    {
        write_str(out, key);
        write_str(out, value);
    }
}

/// At least as many bytes as [`write`] writes for the same arguments (a few more: every string's
/// marker is counted at its longest), so that its buffer is allocated once, never grown: growing it
/// copied the frame once more per message (about 600 instructions on the publishing path).
pub(crate) fn len_bound(
    wire: &Wire<'_, &[u8]>,
    channel: Option<&Channel>,
    headers: &Headers,
    extra: Option<(&str, &str)>,
) -> usize {
    // A string or bin of `len` bytes takes at most `len + 5` (the marker and a 32-bit length).
    let text = |len: usize| len + 5;
    let optional = |value: &Option<Cow<'_, str>>, key: &str| {
        value
            .as_ref()
            .map_or(0, |value| text(key.len()) + text(value.len()))
    };
    let id = match &wire.id {
        WireId::Id(_) => 36,
        WireId::Text(text) => text.len(),
    };
    let channel_fields = match channel {
        Some(channel) => channel.frame_fields().len(),
        None => [
            ("class", &wire.class),
            ("channel", &wire.channel),
            ("direction", &wire.direction),
            ("session", &wire.session),
        ]
        .iter()
        .map(|(key, value)| text(key.len()) + text(value.len()))
        .sum(),
    };
    let headers_len: usize = headers
        .iter()
        .map(|(name, value)| text(name.len()) + text(value.len()))
        .sum::<usize>()
        + extra.map_or(0, |(name, value)| text(name.len()) + text(value.len()));
    // The map's marker; `v`, `attempt` (keys and 64-bit values at most); `headers`' key and marker.
    let fixed = 5 + 2 * (text("attempt".len()) + 9) + text("headers".len()) + 5;
    fixed
        + text("id".len())
        + text(id)
        + channel_fields
        + optional(&wire.channel_class, "channel_class")
        + text("content_type".len())
        + text(wire.content_type.len())
        + text("timestamp".len())
        + 9
        + optional(&wire.correlation_id, "correlation_id")
        + optional(&wire.reply_to, "reply_to")
        + headers_len
        + text("payload".len())
        + text(wire.payload.len())
}

/// Writes `wire` (payload as bytes) as a MessagePack map, with `headers` (the envelope's; `wire`'s own
/// are not read) and `extra`, which replaces a header of its name. `channel`: the channel whose
/// strings `wire` holds, when the message's class is the channel's (its fields are then copied in
/// one piece).
pub(crate) fn write(
    wire: &Wire<'_, &[u8]>,
    channel: Option<&Channel>,
    headers: &Headers,
    extra: Option<(&str, &str)>,
    out: &mut Vec<u8>,
) {
    let optional = [
        wire.channel_class.as_deref(),
        wire.correlation_id.as_deref(),
        wire.reply_to.as_deref(),
    ];
    // `v`, `attempt` and `headers` are left out when they hold their defaults (1, 1, empty), as the
    // wire format allows: fewer bytes for the broker to store and for every reader to read.
    let replaced = extra.is_some_and(|(name, _)| headers.contains_key(name));
    let header_count = headers.len() + usize::from(extra.is_some() && !replaced);
    let defaults = [wire.v != 1, wire.attempt != 1, header_count != 0];
    let fields = 8
        + optional.iter().filter(|field| field.is_some()).count()
        + defaults.iter().filter(|written| **written).count();
    write_map_len(out, fields);
    if wire.v != 1 {
        write_str(out, "v");
        write_uint(out, u64::from(wire.v));
    }
    write_str(out, "id");
    match &wire.id {
        WireId::Id(id) => write_str(
            out,
            id.as_uuid()
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        ),
        WireId::Text(text) => write_str(out, text.as_ref()),
    }
    match channel {
        Some(channel) => out.extend_from_slice(channel.frame_fields()),
        None => write_channel_fields(
            out,
            [&wire.class, &wire.channel, &wire.direction, &wire.session],
        ),
    }
    if let Some(channel_class) = &wire.channel_class {
        write_str(out, "channel_class");
        write_str(out, channel_class);
    }
    write_str(out, "content_type");
    write_str(out, &wire.content_type);
    write_str(out, "timestamp");
    write_uint(out, wire.timestamp);
    if let Some(correlation_id) = &wire.correlation_id {
        write_str(out, "correlation_id");
        write_str(out, correlation_id);
    }
    if let Some(reply_to) = &wire.reply_to {
        write_str(out, "reply_to");
        write_str(out, reply_to);
    }
    if wire.attempt != 1 {
        write_str(out, "attempt");
        write_uint(out, u64::from(wire.attempt));
    }
    if header_count != 0 {
        write_str(out, "headers");
        write_map_len(out, header_count);
    }
    for (name, value) in headers {
        if extra.is_some_and(|(extra, _)| extra == name) {
            continue;
        }
        write_str(out, name);
        write_str(out, value);
    }
    if let Some((name, value)) = extra {
        write_str(out, name);
        write_str(out, value);
    }
    write_str(out, "payload");
    write_bin(out, wire.payload);
}

fn write_map_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=15 => out.push(0x80 | len as u8),
        16..=0xffff => {
            out.push(0xde);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdf);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    let len = text.len();
    match len {
        0..=31 => out.push(0xa0 | len as u8),
        32..=0xff => out.extend_from_slice(&[0xd9, len as u8]),
        0x100..=0xffff => {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(text.as_bytes());
}

fn write_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    match len {
        0..=0xff => out.extend_from_slice(&[0xc4, len as u8]),
        0x100..=0xffff => {
            out.push(0xc5);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xc6);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(bytes);
}

fn write_uint(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0x7f => out.push(value as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, value as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(value as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&value.to_be_bytes());
        }
    }
}

/// Reads a frame; the payload and strings borrow from `frame`, or from `hint`: a string equal to the
/// hint's component (most frames come on the channel of the frame before) is the hint's own, and is
/// not checked for UTF-8 again; so is a known content type. The id is parsed here when it is a UUID.
/// The header named `take` is returned apart, not among the wire's headers (the last value when the
/// frame repeats it): a frame whose only header is taken needs no list of headers.
pub(crate) fn read<'a>(
    frame: &'a [u8],
    hint: Option<&'a Channel>,
    take: Option<&str>,
) -> Result<(Wire<'a, &'a [u8]>, Option<&'a str>), String> {
    let mut reader = Reader {
        bytes: frame,
        at: 0,
    };
    let fields = reader.map_len()?;
    let mut v = None;
    let mut id = None;
    let mut class = None;
    let mut channel = None;
    let mut direction = None;
    let mut session = None;
    let mut channel_class = None;
    let mut content_type = None;
    let mut timestamp = None;
    let mut correlation_id = None;
    let mut reply_to = None;
    let mut attempt = None;
    let mut headers = Vec::new();
    let mut taken = None;
    let mut payload = None;
    let mut remaining = fields;
    while remaining > 0 {
        remaining -= 1;
        // The hint's four channel fields, as its own frames write them: taken in one comparison.
        if let Some(hint) = hint
            && remaining >= 3
            && reader.bytes[reader.at..].starts_with(hint.frame_fields())
        {
            reader.at += hint.frame_fields().len();
            remaining -= 3;
            class = Some(hint.class());
            channel = Some(hint.name());
            direction = Some(hint.direction());
            session = Some(hint.session());
            continue;
        }
        // Keys are compared as bytes: an unknown or non-UTF-8 key is skipped like any unknown field.
        let key = reader.raw_str()?;
        match key {
            b"v" => v = Some(reader.uint_u32("v")?),
            b"id" => id = Some(reader.id()?),
            b"class" => class = Some(reader.str_like(hint.map(Channel::class))?),
            b"channel" => channel = Some(reader.str_like(hint.map(Channel::name))?),
            b"direction" => direction = Some(reader.str_like(hint.map(Channel::direction))?),
            b"session" => session = Some(reader.str_like(hint.map(Channel::session))?),
            b"channel_class" => {
                channel_class = match reader.peek_nil() {
                    true => reader.optional_str()?,
                    false => Some(reader.str_like(hint.map(Channel::class))?),
                }
            }
            b"content_type" => content_type = Some(reader.known_str(&KNOWN_CONTENT_TYPES)?),
            b"timestamp" => timestamp = Some(reader.uint()?),
            b"correlation_id" => correlation_id = reader.optional_str()?,
            b"reply_to" => reply_to = reader.optional_str()?,
            b"attempt" => attempt = Some(reader.uint_u32("attempt")?),
            b"headers" => {
                headers.clear();
                taken = None;
                let len = reader.map_len()?;
                for _ in 0..len {
                    let name = reader.str_bytes_or_nil()?;
                    let value = reader.str()?;
                    // The taken header's name is `take`'s bytes: UTF-8 without a check.
                    if let (Some(name), Some(take)) = (name, take)
                        && name == take.as_bytes()
                    {
                        taken = Some(value);
                        continue;
                    }
                    let Some(name) = name else {
                        return Err("expected a string, found nil".to_string());
                    };
                    if headers.is_empty() {
                        // Bounded by what is left of the frame (two bytes at least per header) and by
                        // a small cap, not by what a hostile length claims; more headers grow the list
                        // as they come.
                        headers.reserve(len.min((reader.bytes.len() - reader.at) / 2 + 1).min(64));
                    }
                    headers.push((Cow::Borrowed(utf8(name)?), Cow::Borrowed(value)));
                }
            }
            b"payload" => payload = Some(reader.bytes()?),
            // Fields of newer writers are skipped: readers ignore keys they do not know.
            _ => reader.skip(0)?,
        }
    }
    if reader.at != frame.len() {
        return Err(format!(
            "{} bytes after the end of the frame",
            frame.len() - reader.at
        ));
    }
    let wire = Wire {
        v: v.unwrap_or(1),
        id: id.ok_or("missing field `id`")?,
        class: Cow::Borrowed(required(class, "class")?),
        channel: Cow::Borrowed(required(channel, "channel")?),
        direction: Cow::Borrowed(required(direction, "direction")?),
        session: Cow::Borrowed(required(session, "session")?),
        channel_class: channel_class.map(Cow::Borrowed),
        content_type: Cow::Borrowed(required(content_type, "content_type")?),
        timestamp: timestamp.ok_or("missing field `timestamp`")?,
        correlation_id: correlation_id.map(Cow::Borrowed),
        reply_to: reply_to.map(Cow::Borrowed),
        attempt: attempt.unwrap_or(1),
        headers,
        payload: payload.ok_or("missing field `payload`")?,
    };
    Ok((wire, taken))
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|error| format!("a string is not UTF-8: {error}"))
}

fn required<'a>(value: Option<&'a str>, name: &str) -> Result<&'a str, String> {
    value.ok_or_else(|| format!("missing field `{name}`"))
}

/// How deep nested values of unknown fields may go before the frame is refused (bounds the recursion
/// of `skip` on hostile input).
const MAX_DEPTH: usize = 32;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "the frame ends early (wanted {len} bytes at byte {})",
                self.at
            ));
        };
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, len: usize) -> Result<u64, String> {
        Ok(self
            .take(len)?
            .iter()
            .fold(0, |value, byte| (value << 8) | u64::from(*byte)))
    }

    fn map_len(&mut self) -> Result<usize, String> {
        match self.byte()? {
            marker @ 0x80..=0x8f => Ok(usize::from(marker & 0x0f)),
            0xde => Ok(self.be(2)? as usize),
            0xdf => Ok(self.be(4)? as usize),
            marker => Err(format!("expected a map, found marker 0x{marker:02x}")),
        }
    }

    fn str_len(&mut self, marker: u8) -> Result<Option<usize>, String> {
        Ok(Some(match marker {
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return Ok(None),
        }))
    }

    /// A string's bytes (a `str` marker and its length), not checked for UTF-8.
    fn str_bytes(&mut self) -> Result<&'a [u8], String> {
        self.string_bytes("a string")
    }

    /// A string's bytes; `what` names it in the error when something else comes.
    fn string_bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let marker = self.byte()?;
        let Some(len) = self.str_len(marker)? else {
            return Err(format!("expected {what}, found marker 0x{marker:02x}"));
        };
        self.take(len)
    }

    /// A string, which is `known` itself when it has the same bytes (no UTF-8 check then).
    fn str_like(&mut self, known: Option<&'a str>) -> Result<&'a str, String> {
        let bytes = self.str_bytes()?;
        match known {
            Some(known) if known.as_bytes() == bytes => Ok(known),
            _ => utf8(bytes),
        }
    }

    /// A string, which is one of `known` when it has the same bytes.
    fn known_str(&mut self, known: &[&'static str]) -> Result<&'a str, String> {
        let bytes = self.str_bytes()?;
        match known.iter().find(|known| known.as_bytes() == bytes) {
            Some(known) => Ok(known),
            None => utf8(bytes),
        }
    }

    /// The message id: parsed when it is a UUID, else kept as text (the envelope refuses it, naming it).
    fn id(&mut self) -> Result<WireId<'a>, String> {
        let bytes = self.str_bytes()?;
        match uuid::Uuid::try_parse_ascii(bytes) {
            Ok(uuid) => Ok(WireId::Id(MessageId::from(uuid))),
            Err(_) => Ok(WireId::Text(Cow::Borrowed(utf8(bytes)?))),
        }
    }

    /// Whether the next value is nil (without reading it).
    fn peek_nil(&self) -> bool {
        self.bytes.get(self.at) == Some(&0xc0)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        self.optional_str()?
            .ok_or_else(|| "expected a string, found nil".to_string())
    }

    /// A string's bytes (not checked for UTF-8), or `None` for nil.
    fn str_bytes_or_nil(&mut self) -> Result<Option<&'a [u8]>, String> {
        let marker = self.byte()?;
        if marker == 0xc0 {
            return Ok(None);
        }
        let Some(len) = self.str_len(marker)? else {
            return Err(format!("expected a string, found marker 0x{marker:02x}"));
        };
        self.take(len).map(Some)
    }

    /// A key's bytes, not checked for UTF-8.
    fn raw_str(&mut self) -> Result<&'a [u8], String> {
        self.string_bytes("a string key")
    }

    fn optional_str(&mut self) -> Result<Option<&'a str>, String> {
        let marker = self.byte()?;
        if marker == 0xc0 {
            return Ok(None);
        }
        let Some(len) = self.str_len(marker)? else {
            return Err(format!("expected a string, found marker 0x{marker:02x}"));
        };
        utf8(self.take(len)?).map(Some)
    }

    /// Binary data: `bin`, or `str` from writers that predate the `bin` type.
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let marker = self.byte()?;
        let len = match marker {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => match self.str_len(marker)? {
                Some(len) => len,
                None => return Err(format!("expected binary data, found marker 0x{marker:02x}")),
            },
        };
        self.take(len)
    }

    fn uint(&mut self) -> Result<u64, String> {
        let marker = self.byte()?;
        let signed = |value: i64| {
            u64::try_from(value)
                .map_err(|_| format!("expected a non-negative integer, found {value}"))
        };
        match marker {
            0x00..=0x7f => Ok(u64::from(marker)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            0xd0 => signed(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => signed(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => signed(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => signed(self.be(8)? as i64),
            _ => Err(format!("expected an integer, found marker 0x{marker:02x}")),
        }
    }

    fn uint_u32(&mut self, field: &str) -> Result<u32, String> {
        let value = self.uint()?;
        u32::try_from(value).map_err(|_| format!("`{field}` is {value}, more than a u32 holds"))
    }

    /// Skips one value of any type.
    fn skip(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        let marker = self.byte()?;
        let (skip_bytes, items) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(marker & 0x0f)),
            0x90..=0x9f => (0, usize::from(marker & 0x0f)),
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)? as usize),
            0xdd => (0, self.be(4)? as usize),
            0xde => (0, 2 * self.be(2)? as usize),
            0xdf => (0, 2 * self.be(4)? as usize),
            _ => return Err(format!("invalid marker 0x{marker:02x}")),
        };
        self.take(skip_bytes)?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }
}
