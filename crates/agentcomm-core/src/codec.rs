//! Payload codecs: MessagePack (the default) and JSON.
//!
//! MessagePack is written in its map form (field names included, like JSON) so that adding an optional
//! field keeps old and new readers working: an old reader ignores the new key, a new reader fills a
//! missing one from `#[serde(default)]`. Never use `#[serde(deny_unknown_fields)]` on a message.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The content type of MessagePack payloads.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";
/// The content type of JSON payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// The content type of payloads that are raw bytes, such as a malformed frame kept in a dead letter.
pub const BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// How deep the values of a MessagePack payload may nest: as deep as serde_json lets a JSON payload
/// go. rmp-serde's own limit (1024) let a payload of about a kilobyte overflow the stack of the task
/// decoding it, which aborts the whole process.
const MAX_DEPTH: usize = 128;

/// The shortest MessagePack payload read for its depth before it is decoded. rmp-serde's own limit
/// counts maps and arrays, but not the one-entry map holding an enum's variant: a type such as
/// `enum Filter { Not(Box<Filter>), .. }` read `{"Not":{"Not":..}}` with no limit, and a payload of
/// some kilobytes overflowed the stack. Each such level takes two bytes at least, so a shorter
/// payload stays far from that, and the hot path of small messages does not pay for the reading.
const SCAN_FROM: usize = 256;

/// Whether the first value of the MessagePack `payload` holds maps and arrays nested `max` deep or
/// more (what rmp-serde and serde_json refuse), enum variants' maps included; read without recursion.
/// A truncated or malformed payload is left for the decoder to report.
fn nests_deeper_than(payload: &[u8], max: usize) -> bool {
    // The entries left to read in each map or array that is open, the innermost last.
    let mut open: Vec<u64> = Vec::new();
    let mut at = 0;
    while let Some(&marker) = payload.get(at) {
        at += 1;
        // A big-endian length of `size` bytes at `at`, and `at` moved past it.
        let mut length = |size: usize| -> Option<u64> {
            let bytes = payload.get(at..at + size)?;
            at += size;
            Some(bytes.iter().fold(0, |n, &b| n << 8 | u64::from(b)))
        };
        // The entries of a map or an array, or the bytes of any other value after its marker.
        let (entries, skip) = match marker {
            0x80..=0x8f => (Some(2 * u64::from(marker & 0x0f)), Some(0)),
            0x90..=0x9f => (Some(u64::from(marker & 0x0f)), Some(0)),
            0xdc => (length(2), Some(0)),
            0xdd => (length(4), Some(0)),
            0xde => (length(2).map(|n| 2 * n), Some(0)),
            0xdf => (length(4).map(|n| 2 * n), Some(0)),
            0xa0..=0xbf => (None, Some(u64::from(marker & 0x1f))),
            // str8, bin8; str16, bin16; str32, bin32.
            0xd9 | 0xc4 => (None, length(1)),
            0xda | 0xc5 => (None, length(2)),
            0xdb | 0xc6 => (None, length(4)),
            // ext8, ext16, ext32: the length, then a type byte.
            0xc7 => (None, length(1).map(|n| n + 1)),
            0xc8 => (None, length(2).map(|n| n + 1)),
            0xc9 => (None, length(4).map(|n| n + 1)),
            // fixext 1, 2, 4, 8, 16, with their type byte.
            0xd4 => (None, Some(2)),
            0xd5 => (None, Some(3)),
            0xd6 => (None, Some(5)),
            0xd7 => (None, Some(9)),
            0xd8 => (None, Some(17)),
            0xcc | 0xd0 => (None, Some(1)),
            0xcd | 0xd1 => (None, Some(2)),
            0xca | 0xce | 0xd2 => (None, Some(4)),
            0xcb | 0xcf | 0xd3 => (None, Some(8)),
            // fixints, nil, booleans (and the unused 0xc1).
            _ => (None, Some(0)),
        };
        if matches!(marker, 0x80..=0x9f | 0xdc..=0xdf) {
            let Some(entries) = entries else {
                return false;
            };
            if open.len() + 1 >= max {
                return true;
            }
            if entries > 0 {
                open.push(entries);
                continue;
            }
        } else {
            let Some(skip) = skip.and_then(|skip| usize::try_from(skip).ok()) else {
                return false;
            };
            at = at.saturating_add(skip);
        }
        // One value read: the entry of the innermost open map or array, which may end it.
        loop {
            let Some(left) = open.last_mut() else {
                return false;
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            open.pop();
        }
    }
    false
}

/// How a message is turned into payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack, struct-as-map (`rmp_serde::to_vec_named`). Compact and fast; the default.
    #[default]
    MessagePack,
    /// JSON. Readable with any tool; larger and slower. JSON has no NaN or infinity: a message holding
    /// one is refused when it is encoded (MessagePack carries them).
    Json,
}

thread_local! {
    /// Where [`Codec::encode`] writes (see [`encode_in_scratch`]).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest scratch buffer a thread keeps between encodes: one large message does not hold its
/// size for the thread's life.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Runs `encode` on this thread's scratch buffer, emptied, and copies what it wrote into an allocation
/// of exactly its length: `Bytes` takes such a buffer as it is, while one with room to spare costs it a
/// second allocation (its shared header), and a buffer grown as it is written costs more than one. A
/// buffer grown past [`SCRATCH_KEEP`], which the thread does not keep, is handed over instead of
/// copied. An encode inside an encode (a `Serialize` that encodes) finds the buffer taken and uses its
/// own.
fn encode_in_scratch(encode: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<Bytes> {
    let mut encode = Some(encode);
    // `try_with`: an encode in a thread-local's destructor, after the buffer is gone, is not a panic.
    let in_scratch = SCRATCH.try_with(|scratch| {
        let mut buffer = scratch.try_borrow_mut().ok()?;
        let encode = encode.take()?;
        buffer.clear();
        let encoded = encode(&mut buffer);
        if buffer.capacity() > SCRATCH_KEEP {
            // Not kept: handed over as it is (shrunk in place), not copied.
            let mut taken = std::mem::take(&mut *buffer);
            taken.shrink_to_fit();
            return Some(encoded.map(|()| Bytes::from(taken)));
        }
        Some(encoded.map(|()| Bytes::copy_from_slice(&buffer)))
    });
    match (in_scratch, encode) {
        (Ok(Some(encoded)), _) => encoded,
        (_, Some(encode)) => {
            let mut buffer = Vec::new();
            encode(&mut buffer).map(|()| Bytes::from(buffer))
        }
        (_, None) => unreachable!("the encode ran in the scratch buffer"),
    }
}

impl Codec {
    /// The content type written in envelopes encoded with this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::MessagePack => MSGPACK_CONTENT_TYPE,
            Codec::Json => JSON_CONTENT_TYPE,
        }
    }

    /// The codec for a content type, if it is one of ours. As media types are (RFC 9110), the type is
    /// read without regard to letter case and with its parameters: `application/json;
    /// charset=utf-8` is JSON, while a charset other than UTF-8 (which JSON requires) is not read.
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        match content_type {
            MSGPACK_CONTENT_TYPE => Some(Codec::MessagePack),
            JSON_CONTENT_TYPE => Some(Codec::Json),
            _ => Self::from_media_type(content_type),
        }
    }

    /// [`Codec::from_content_type`] for anything but the two content types agentcomm writes.
    #[cold]
    fn from_media_type(content_type: &str) -> Option<Codec> {
        let mut parts = content_type.split(';');
        let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let codec = match essence.as_str() {
            MSGPACK_CONTENT_TYPE | "application/x-msgpack" | "application/vnd.msgpack" => {
                Codec::MessagePack
            }
            JSON_CONTENT_TYPE => Codec::Json,
            _ => return None,
        };
        for parameter in parts.map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = parameter.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            // A charset means nothing to MessagePack (`charset=binary` is seen); JSON is UTF-8.
            if codec == Codec::Json
                && name.trim().eq_ignore_ascii_case("charset")
                && !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8"))
            {
                return None;
            }
        }
        Some(codec)
    }

    /// Parses a codec name as written in configuration: `msgpack`/`messagepack` or `json`.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name.to_ascii_lowercase().as_str() {
            "msgpack" | "messagepack" | "rmp" => Some(Codec::MessagePack),
            "json" => Some(Codec::Json),
            _ => None,
        }
    }

    /// Encodes a message.
    pub fn encode<M: Serialize + ?Sized>(self, class: &str, message: &M) -> Result<Bytes> {
        match self {
            Codec::MessagePack => encode_in_scratch(|buffer| {
                message
                    .serialize(&mut rmp_serde::Serializer::new(buffer).with_struct_map())
                    .map_err(|e| Error::encode(class, e))
            }),
            Codec::Json => encode_in_scratch(|buffer| {
                serde_json::to_writer(&mut *buffer, message)
                    .map_err(|e| Error::encode(class, e))?;
                // serde_json writes NaN and the infinities as `null`: the receiver would then fail to
                // decode an `f64` field, or read `None` from an `Option<f64>` that held a number. A
                // payload with a `null` in it is checked again, for such numbers, and refused.
                if buffer.windows(4).any(|window| window == b"null") {
                    finite::check(message).map_err(|e| Error::encode(class, e))?;
                }
                Ok(())
            }),
        }
    }

    /// Decodes a message. MessagePack values nested deeper than 128 levels (even in a field the message
    /// does not have; an enum's variant is a level, as its object is in JSON) are refused rather than risking the stack of the decoding task, as serde_json
    /// refuses JSON nested that deep.
    pub fn decode<M: DeserializeOwned>(self, class: &str, payload: &[u8]) -> Result<M> {
        match self {
            Codec::MessagePack => {
                if payload.len() >= SCAN_FROM && nests_deeper_than(payload, MAX_DEPTH) {
                    return Err(Error::decode(
                        class,
                        format!("values nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
                let mut deserializer = rmp_serde::Deserializer::from_read_ref(payload);
                deserializer.set_max_depth(MAX_DEPTH);
                M::deserialize(&mut deserializer).map_err(|e| match e {
                    rmp_serde::decode::Error::DepthLimitExceeded => Error::decode(
                        class,
                        format!("values nested deeper than {MAX_DEPTH} levels"),
                    ),
                    e => Error::decode(class, e),
                })
            }
            Codec::Json => serde_json::from_slice(payload).map_err(|e| Error::decode(class, e)),
        }
    }
}

/// Finds a NaN or an infinite number in a value about to be written as JSON, which has neither.
mod finite {
    use std::fmt;

    use serde::ser::{self, Serialize};

    /// Why a value cannot be written as JSON: the number and where it is, or a `Serialize` impl's own
    /// error.
    #[derive(Debug)]
    pub(super) enum NotFinite {
        /// A NaN or an infinity; `path` from the innermost step out (built as the error goes up).
        Number { text: String, path: Vec<Step> },
        /// An error of the value's own `Serialize` impl.
        Custom(String),
    }

    /// One step of the way from the message to the number, as the JSON has it.
    #[derive(Debug)]
    pub(super) enum Step {
        /// A struct field, or a map key.
        Name(String),
        /// An enum variant.
        Variant(&'static str),
        /// An element of a sequence or a tuple.
        Index(usize),
    }

    impl NotFinite {
        /// The same error, one step further out.
        fn within(mut self, step: Step) -> Self {
            if let NotFinite::Number { path, .. } = &mut self {
                path.push(step);
            }
            self
        }
    }

    impl fmt::Display for NotFinite {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let (text, path) = match self {
                NotFinite::Custom(message) => return f.write_str(message),
                NotFinite::Number { text, path } => (text, path),
            };
            f.write_str(text)?;
            if !path.is_empty() {
                f.write_str(" in field `")?;
                for (at, step) in path.iter().rev().enumerate() {
                    match step {
                        Step::Name(name) if at == 0 => f.write_str(name)?,
                        Step::Variant(name) if at == 0 => f.write_str(name)?,
                        Step::Name(name) => write!(f, ".{name}")?,
                        Step::Variant(name) => write!(f, ".{name}")?,
                        Step::Index(index) => write!(f, "[{index}]")?,
                    }
                }
                f.write_str("`")?;
            }
            f.write_str(
                " cannot be written as JSON (it has no NaN or infinity, and serde_json would write \
                 null, which the receiver cannot read back as that number); publish with the \
                 MessagePack codec (the default), or ",
            )?;
            // Validation rules apply to the message's own fields, not to elements or nested values.
            if let [Step::Name(_)] = path.as_slice() {
                f.write_str("refuse such values with #[message(min = .., max = ..)] on the field")
            } else {
                f.write_str("keep such values out of the message before publishing it")
            }
        }
    }

    impl std::error::Error for NotFinite {}

    impl ser::Error for NotFinite {
        fn custom<T: fmt::Display>(message: T) -> Self {
            NotFinite::Custom(message.to_string())
        }
    }

    /// Fails on the first NaN or infinity in `value`, naming where it is.
    pub(super) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NotFinite> {
        value.serialize(Checker)
    }

    fn named<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<(), NotFinite> {
        value
            .serialize(Checker)
            .map_err(|e| e.within(Step::Name(name.to_owned())))
    }

    /// Walks a value without writing it.
    struct Checker;

    /// Walks the elements of a sequence, a tuple or a tuple variant, counting them.
    struct Elements {
        variant: Option<&'static str>,
        next: usize,
    }

    impl Elements {
        fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            let index = self.next;
            self.next += 1;
            value.serialize(Checker).map_err(|e| {
                let e = e.within(Step::Index(index));
                match self.variant {
                    Some(variant) => e.within(Step::Variant(variant)),
                    None => e,
                }
            })
        }
    }

    /// Walks the fields of a struct or struct variant, and the entries of a map.
    struct Fields {
        variant: Option<&'static str>,
    }

    impl Fields {
        fn field<T: Serialize + ?Sized>(
            &mut self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            named(field, value).map_err(|e| match self.variant {
                Some(variant) => e.within(Step::Variant(variant)),
                None => e,
            })
        }
    }

    impl ser::Serializer for Checker {
        type Ok = ();
        type Error = NotFinite;
        type SerializeSeq = Elements;
        type SerializeTuple = Elements;
        type SerializeTupleStruct = Elements;
        type SerializeTupleVariant = Elements;
        type SerializeMap = Fields;
        type SerializeStruct = Fields;
        type SerializeStructVariant = Fields;

        fn serialize_f32(self, v: f32) -> Result<(), NotFinite> {
            number(v.is_finite(), &v)
        }
        fn serialize_f64(self, v: f64) -> Result<(), NotFinite> {
            number(v.is_finite(), &v)
        }
        fn serialize_bool(self, _: bool) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i128(self, _: i128) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u128(self, _: u128) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_char(self, _: char) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_none(self) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NotFinite> {
            value.serialize(self)
        }
        fn serialize_unit(self) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            value.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            value
                .serialize(Checker)
                .map_err(|e| e.within(Step::Variant(variant)))
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Elements, NotFinite> {
            Ok(Elements {
                variant: None,
                next: 0,
            })
        }
        fn serialize_tuple(self, _: usize) -> Result<Elements, NotFinite> {
            self.serialize_seq(None)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Elements, NotFinite> {
            self.serialize_seq(None)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            _: usize,
        ) -> Result<Elements, NotFinite> {
            Ok(Elements {
                variant: Some(variant),
                next: 0,
            })
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Fields, NotFinite> {
            Ok(Fields { variant: None })
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields, NotFinite> {
            Ok(Fields { variant: None })
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            _: usize,
        ) -> Result<Fields, NotFinite> {
            Ok(Fields {
                variant: Some(variant),
            })
        }
    }

    fn number(finite: bool, text: &dyn fmt::Display) -> Result<(), NotFinite> {
        if finite {
            return Ok(());
        }
        Err(NotFinite::Number {
            text: text.to_string(),
            path: Vec::new(),
        })
    }

    impl ser::SerializeSeq for Elements {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.element(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTuple for Elements {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.element(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTupleStruct for Elements {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.element(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTupleVariant for Elements {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.element(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeMap for Fields {
        type Ok = ();
        type Error = NotFinite;
        // A non-finite float key is refused by serde_json itself.
        fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            value.serialize(Checker)
        }
        // Maps, and the fields of a struct with a `#[serde(flatten)]` field, come here: the key
        // names the way to the number (as JSON writes it), made only when there is one.
        fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
            &mut self,
            key: &K,
            value: &V,
        ) -> Result<(), NotFinite> {
            value.serialize(Checker).map_err(|e| {
                let key = match serde_json::to_value(key) {
                    Ok(serde_json::Value::String(key)) => key,
                    Ok(other) => other.to_string(),
                    Err(_) => "?".to_owned(),
                };
                e.within(Step::Name(key))
            })
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeStruct for Fields {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.field(field, value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeStructVariant for Fields {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.field(field, value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PaymentV1 {
        amount: f64,
        user_id: String,
    }

    /// A message whose `Serialize` encodes another message with the codec (a payload carried as bytes):
    /// the inner encode finds the thread's scratch buffer taken by the outer one.
    struct Wrapper(PaymentV1);

    impl Serialize for Wrapper {
        fn serialize<S: serde::Serializer>(
            &self,
            serializer: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            let inner = Codec::MessagePack
                .encode("PaymentV1", &self.0)
                .map_err(serde::ser::Error::custom)?;
            serializer.serialize_bytes(&inner)
        }
    }

    fn decoded_copy(payment: &PaymentV1) -> PaymentV1 {
        PaymentV1 {
            amount: payment.amount,
            user_id: payment.user_id.clone(),
        }
    }

    #[test]
    fn an_encode_inside_an_encode_gets_its_own_buffer() {
        let payment = PaymentV1 {
            amount: 12.5,
            user_id: "user-1".into(),
        };
        let outer = Codec::MessagePack
            .encode("Wrapper", &Wrapper(payment))
            .unwrap();
        let inner: serde_bytes::ByteBuf = rmp_serde::from_slice(&outer).unwrap();
        let decoded: PaymentV1 = Codec::MessagePack.decode("PaymentV1", &inner).unwrap();
        assert_eq!(
            decoded,
            PaymentV1 {
                amount: 12.5,
                user_id: "user-1".into()
            }
        );
        // The same inside a JSON encode.
        let json = Codec::Json
            .encode("Wrapper", &Wrapper(decoded_copy(&decoded)))
            .unwrap();
        let bytes: Vec<u8> = serde_json::from_slice(&json).unwrap();
        assert_eq!(bytes, inner.into_vec());
        // Encodes after it, on the same thread, are whole and independent of each other.
        let first = Codec::MessagePack.encode("PaymentV1", &decoded).unwrap();
        let big = PaymentV1 {
            amount: 1.0,
            user_id: "x".repeat(100_000),
        };
        let large = Codec::MessagePack.encode("PaymentV1", &big).unwrap();
        let second = Codec::MessagePack.encode("PaymentV1", &decoded).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            Codec::MessagePack
                .decode::<PaymentV1>("PaymentV1", &large)
                .unwrap(),
            big
        );
        assert_eq!(
            Codec::MessagePack
                .decode::<PaymentV1>("PaymentV1", &first)
                .unwrap(),
            decoded
        );
    }

    /// Encodes in its destructor, which runs as its thread ends, after the scratch buffer's (thread-locals
    /// are destroyed in the reverse order of their first use).
    struct EncodesOnExit(std::sync::mpsc::Sender<Result<Bytes>>);

    impl Drop for EncodesOnExit {
        fn drop(&mut self) {
            let payment = PaymentV1 {
                amount: 1.5,
                user_id: "user-9".into(),
            };
            let _ = self
                .0
                .send(Codec::MessagePack.encode("PaymentV1", &payment));
        }
    }

    thread_local! {
        static ON_EXIT: std::cell::RefCell<Option<EncodesOnExit>> = const { std::cell::RefCell::new(None) };
    }

    #[test]
    fn an_encode_while_a_thread_ends_works_without_the_scratch_buffer() {
        let (sender, encoded) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            ON_EXIT.with(|slot| *slot.borrow_mut() = Some(EncodesOnExit(sender)));
            // The scratch buffer's first use: destroyed before `ON_EXIT`.
            Codec::MessagePack.encode("PaymentV1", &1u8).unwrap();
        })
        .join()
        .unwrap();
        let encoded = encoded.recv().unwrap().unwrap();
        let decoded: PaymentV1 = Codec::MessagePack.decode("PaymentV1", &encoded).unwrap();
        assert_eq!(decoded.user_id, "user-9");
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PaymentV2 {
        amount: f64,
        user_id: String,
        #[serde(default)]
        currency: Option<String>,
    }

    #[test]
    fn adding_an_optional_field_keeps_old_and_new_readers_working() {
        for codec in [Codec::MessagePack, Codec::Json] {
            let old = PaymentV1 {
                amount: 12.5,
                user_id: "u1".into(),
            };
            let new = PaymentV2 {
                amount: 12.5,
                user_id: "u1".into(),
                currency: Some("EUR".into()),
            };

            // A new reader reads what an old writer wrote: the missing field takes its default.
            let from_old: PaymentV2 = codec
                .decode("Payment", &codec.encode("Payment", &old).unwrap())
                .unwrap();
            assert_eq!(
                from_old,
                PaymentV2 {
                    amount: 12.5,
                    user_id: "u1".into(),
                    currency: None
                }
            );

            // An old reader reads what a new writer wrote: the extra field is ignored.
            let from_new: PaymentV1 = codec
                .decode("Payment", &codec.encode("Payment", &new).unwrap())
                .unwrap();
            assert_eq!(from_new, old);
        }
    }

    #[test]
    fn positional_messagepack_would_break_old_readers() {
        // Why the map form: the array form that `rmp_serde::to_vec` writes breaks an old reader.
        let new = PaymentV2 {
            amount: 1.0,
            user_id: "u".into(),
            currency: None,
        };
        let positional = rmp_serde::to_vec(&new).unwrap();
        assert!(rmp_serde::from_slice::<PaymentV1>(&positional).is_err());
        let named = Codec::MessagePack.encode("Payment", &new).unwrap();
        assert!(
            Codec::MessagePack
                .decode::<PaymentV1>("Payment", &named)
                .is_ok()
        );
    }

    /// JSON has no NaN or infinity: serde_json writes them as `null`, which turned an `Option<f64>`
    /// holding a number into `None` on the receiver, and made an `f64` field undecodable there (the
    /// message dead-lettered, while its publish had succeeded).
    #[test]
    fn json_refuses_numbers_it_cannot_carry_instead_of_writing_null() {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        struct Reading {
            sensor: String,
            value: f64,
            peak: Option<f32>,
            history: Vec<f64>,
            missing: Option<f64>,
        }
        let finite = Reading {
            sensor: "null".into(),
            value: -0.5,
            peak: Some(1.5),
            history: vec![1.0, f64::MAX],
            missing: None,
        };
        let encoded = Codec::Json.encode("Reading", &finite).unwrap();
        let read: Reading = Codec::Json.decode("Reading", &encoded).unwrap();
        assert_eq!(read, finite);

        let cases = [
            (
                "value",
                Reading {
                    value: f64::NAN,
                    ..finite.clone()
                },
            ),
            (
                "peak",
                Reading {
                    peak: Some(f32::INFINITY),
                    ..finite.clone()
                },
            ),
            (
                "history[1]",
                Reading {
                    history: vec![1.0, f64::NEG_INFINITY],
                    ..finite.clone()
                },
            ),
            (
                "missing",
                Reading {
                    missing: Some(f64::NAN),
                    ..finite.clone()
                },
            ),
        ];
        for (field, reading) in cases {
            let error = Codec::Json.encode("Reading", &reading).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(&format!("field `{field}`")), "{text}");
            assert!(
                text.contains("MessagePack"),
                "the error names the fix: {text}"
            );
            // MessagePack carries them.
            let encoded = Codec::MessagePack.encode("Reading", &reading).unwrap();
            let read: Reading = Codec::MessagePack.decode("Reading", &encoded).unwrap();
            assert_eq!(format!("{read:?}"), format!("{reading:?}"));
        }
    }

    /// The error says where the number is, as the JSON would have had it: through nested structs,
    /// sequences, maps, enum variants and `#[serde(flatten)]` (whose fields were named by none), and
    /// points at validation rules only for the message's own fields, the only ones they apply to.
    #[test]
    fn json_names_the_way_to_a_number_it_cannot_carry() {
        #[derive(Serialize)]
        struct Line {
            price: Option<f64>,
        }
        #[derive(Serialize)]
        enum Shape {
            Circle(f32),
            Point(f32, f32),
            Box { width: f64 },
        }
        #[derive(Serialize)]
        struct Extra {
            weight: f64,
        }
        #[derive(Serialize)]
        struct Order {
            note: Option<String>,
            total: f64,
            lines: Vec<Line>,
            scores: std::collections::BTreeMap<String, f64>,
            shape: Shape,
            pair: (u8, f32),
            #[serde(flatten)]
            extra: Extra,
        }
        let order = || Order {
            note: None,
            total: 1.0,
            lines: vec![Line { price: None }, Line { price: Some(2.0) }],
            scores: [("alice".to_owned(), 1.0)].into(),
            shape: Shape::Circle(1.0),
            pair: (1, 1.0),
            extra: Extra { weight: 1.0 },
        };
        let mut cases: Vec<(&str, Order)> = Vec::new();
        let mut o = order();
        o.total = f64::NAN;
        cases.push(("total", o));
        let mut o = order();
        o.lines[1].price = Some(f64::INFINITY);
        cases.push(("lines[1].price", o));
        let mut o = order();
        o.scores.insert("bob".into(), f64::NEG_INFINITY);
        cases.push(("scores.bob", o));
        let mut o = order();
        o.shape = Shape::Circle(f32::NAN);
        cases.push(("shape.Circle", o));
        let mut o = order();
        o.shape = Shape::Point(0.0, f32::NAN);
        cases.push(("shape.Point[1]", o));
        let mut o = order();
        o.shape = Shape::Box { width: f64::NAN };
        cases.push(("shape.Box.width", o));
        let mut o = order();
        o.pair.1 = f32::INFINITY;
        cases.push(("pair[1]", o));
        let mut o = order();
        o.extra.weight = f64::NAN;
        cases.push(("weight", o));
        for (path, o) in cases {
            let text = Codec::Json.encode("Order", &o).unwrap_err().to_string();
            assert!(
                text.contains(&format!("in field `{path}` ")),
                "{path}: {text}"
            );
            let own_field = !path.contains(['.', '[']);
            assert_eq!(text.contains("#[message(min"), own_field, "{path}: {text}");
        }
        // Not in a field: the message itself, or an enum message's variant.
        let text = Codec::Json.encode("F", &f64::NAN).unwrap_err().to_string();
        assert!(
            text.starts_with("could not encode F: NaN cannot be written"),
            "{text}"
        );
        let text = Codec::Json
            .encode("S", &Shape::Circle(f32::NAN))
            .unwrap_err()
            .to_string();
        assert!(text.contains("in field `Circle` "), "{text}");
        assert!(!text.contains("#[message(min"), "{text}");
    }

    /// A payload of about a kilobyte, an unknown field holding arrays nested a thousand deep, overflowed
    /// the stack of a tokio worker (2 MiB) in a debug build while rmp-serde skipped it (its own limit
    /// is 1024 levels): the process aborted, and a broker redelivering the message crashed it again.
    /// It is refused, as serde_json refuses JSON nested that deep, and a payload nested as deep as JSON
    /// allows is still read.
    #[test]
    fn deeply_nested_payloads_are_refused_not_a_stack_overflow() {
        fn nested_msgpack(depth: usize) -> Vec<u8> {
            let mut payload = Codec::MessagePack
                .encode(
                    "Payment",
                    &PaymentV1 {
                        amount: 1.0,
                        user_id: "u1".into(),
                    },
                )
                .unwrap()
                .to_vec();
            // One more entry in the map: "x" => [[[...nil...]]].
            payload[0] += 1;
            payload.extend_from_slice(&[0xa1, b'x']);
            payload.extend(std::iter::repeat_n(0x91, depth));
            payload.push(0xc0);
            payload
        }
        let decode = |payload: Vec<u8>| {
            // The stack of a tokio worker thread.
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || Codec::MessagePack.decode::<PaymentV1>("Payment", &payload))
                .unwrap()
                .join()
                .unwrap()
        };
        let error = decode(nested_msgpack(1000)).unwrap_err().to_string();
        assert_eq!(
            error,
            "could not decode Payment: values nested deeper than 128 levels"
        );
        let json = format!(
            r#"{{"amount":1.0,"user_id":"u1","x":{}null{}}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        );
        assert!(
            Codec::Json
                .decode::<serde_json::Value>("Payment", json.as_bytes())
                .is_err()
        );
        // As deep as JSON reads.
        let read = decode(nested_msgpack(120)).unwrap();
        assert_eq!(read.user_id, "u1");
        let value: serde_json::Value = Codec::MessagePack
            .decode("Value", &nested_msgpack(120)[..])
            .unwrap();
        assert_eq!(value["user_id"], "u1");
    }

    /// A type whose enum holds itself (`Not(Box<Filter>)`) is written `{"Not":{"Not":..}}`, and
    /// rmp-serde does not count a variant's map against its depth limit: a payload of 25 KB, a chain
    /// of 5,000 `Not`s, overflowed the stack of the thread decoding it (the process aborted, and a
    /// broker redelivering the message crashed it again). It is refused as JSON nested that deep is;
    /// a chain as deep as JSON allows is still read.
    #[test]
    fn enums_nested_deeper_than_json_allows_are_refused_not_a_stack_overflow() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum Filter {
            Not(Box<Filter>),
            Eq(String),
        }
        fn chain(depth: usize) -> Vec<u8> {
            let mut payload = Vec::new();
            for _ in 0..depth {
                // {"Not": ..}
                payload.extend_from_slice(&[0x81, 0xa3, b'N', b'o', b't']);
            }
            // {"Eq": "x"}
            payload.extend_from_slice(&[0x81, 0xa2, b'E', b'q', 0xa1, b'x']);
            payload
        }
        let decode = |payload: Vec<u8>| {
            // The stack of a tokio worker thread.
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || Codec::MessagePack.decode::<Filter>("Filter", &payload))
                .unwrap()
                .join()
                .unwrap()
        };
        let error = decode(chain(5000)).unwrap_err().to_string();
        assert_eq!(
            error,
            "could not decode Filter: values nested deeper than 128 levels"
        );
        let mut expected = Filter::Eq("x".into());
        for _ in 0..100 {
            expected = Filter::Not(Box::new(expected));
        }
        let payload = Codec::MessagePack.encode("Filter", &expected).unwrap();
        assert_eq!(payload[..], chain(100)[..]);
        assert_eq!(decode(chain(100)).unwrap(), expected);
        // As in JSON, where each variant is an object.
        let json = format!(
            r#"{}{{"Eq":"x"}}{}"#,
            r#"{"Not":"#.repeat(200),
            "}".repeat(200)
        );
        assert!(
            Codec::Json
                .decode::<Filter>("Filter", json.as_bytes())
                .is_err()
        );
    }

    /// A long payload is read for its depth before it is decoded: every kind of MessagePack value in
    /// it (strings and binaries of each length form, numbers of each width, maps and arrays of 16-bit
    /// lengths, nil, booleans) is stepped over as it is, and a message nested as deep as JSON allows
    /// is read as it was written.
    #[test]
    fn long_payloads_of_every_kind_of_value_are_read() {
        let mut value = serde_json::json!({
            "text": "t".repeat(40),
            "long_text": "l".repeat(300),
            "huge_text": "h".repeat(70_000),
            "numbers": [1, 200, -1000, 40_000, 3_000_000_000u64, u64::MAX, -1, -100, -40_000, -3_000_000_000i64, i64::MIN, 0.5, 1e300],
            "flags": [true, false, null],
            "many": (0..20).collect::<Vec<u32>>(),
            "wide": (0..20).map(|i| (format!("k{i}"), serde_json::Value::from(i))).collect::<serde_json::Map<_, _>>(),
        });
        for _ in 0..100 {
            value = serde_json::json!([value]);
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Blobs {
            #[serde(with = "serde_bytes_like")]
            short: Vec<u8>,
            #[serde(with = "serde_bytes_like")]
            long: Vec<u8>,
            #[serde(with = "serde_bytes_like")]
            huge: Vec<u8>,
            deep: serde_json::Value,
        }
        /// Writes bytes as MessagePack's bin type.
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(
                bytes: &[u8],
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                serializer.serialize_bytes(bytes)
            }
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<Vec<u8>, D::Error> {
                struct Bytes;
                impl serde::de::Visitor<'_> for Bytes {
                    type Value = Vec<u8>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                        Ok(bytes.to_vec())
                    }
                }
                deserializer.deserialize_bytes(Bytes)
            }
        }
        let blobs = Blobs {
            short: vec![0xdd; 10],
            long: vec![0xdf; 300],
            huge: vec![0x91; 70_000],
            deep: value,
        };
        let payload = Codec::MessagePack.encode("Blobs", &blobs).unwrap();
        assert!(payload.len() > SCAN_FROM);
        let read: Blobs = Codec::MessagePack.decode("Blobs", &payload).unwrap();
        assert_eq!(read, blobs);
    }

    #[test]
    fn decode_errors_name_the_class() {
        let error = Codec::MessagePack
            .decode::<PaymentV1>("PaymentRequest", b"\xc1garbage")
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("could not decode PaymentRequest: "),
            "{error}"
        );
        assert!(Codec::from_content_type("text/plain").is_none());
        assert_eq!(
            Codec::from_content_type(Codec::Json.content_type()),
            Some(Codec::Json)
        );
    }

    #[test]
    fn content_types_are_read_as_media_types() {
        for (content_type, codec) in [
            ("application/msgpack", Some(Codec::MessagePack)),
            ("application/x-msgpack", Some(Codec::MessagePack)),
            ("application/vnd.msgpack", Some(Codec::MessagePack)),
            ("application/json", Some(Codec::Json)),
            // As other programs and HTTP tooling write them.
            ("application/json; charset=utf-8", Some(Codec::Json)),
            ("application/json;charset=UTF-8", Some(Codec::Json)),
            ("Application/JSON", Some(Codec::Json)),
            ("application/json; charset=\"utf-8\"", Some(Codec::Json)),
            (" application/msgpack ; version=1", Some(Codec::MessagePack)),
            (
                "application/msgpack; charset=binary",
                Some(Codec::MessagePack),
            ),
            // JSON is UTF-8; another charset would be decoded wrongly, so it is not read.
            ("application/json; charset=iso-8859-1", None),
            ("application/json; charset=utf-16", None),
            ("application/json; charset", None),
            ("application/jsonx", None),
            ("application/json-seq", None),
            ("text/json", None),
            ("", None),
            (";", None),
        ] {
            assert_eq!(
                Codec::from_content_type(content_type),
                codec,
                "{content_type:?}"
            );
        }
    }

    /// A recursive reader of the first MessagePack value of `payload`, as rmp-serde reads it: `Deep`
    /// when a map or an array starts with `max - 1` others open (nesting `max` deep), `Bad` when the
    /// payload ends or a length cannot be read before that.
    #[derive(Debug, PartialEq)]
    enum Stop {
        Deep,
        Bad,
    }

    fn reference(payload: &[u8], at: &mut usize, open: usize, max: usize) -> Result<(), Stop> {
        let mut take = |n: usize| -> Result<u64, Stop> {
            let end = at.checked_add(n).ok_or(Stop::Bad)?;
            let bytes = payload.get(*at..end).ok_or(Stop::Bad)?;
            *at = end;
            Ok(bytes.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
        };
        let marker = take(1)? as u8;
        let (entries, skip): (u64, u64) = match marker {
            0x80..=0x8f => (2 * u64::from(marker & 0xf), 0),
            0x90..=0x9f => (u64::from(marker & 0xf), 0),
            0xdc => (take(2)?, 0),
            0xdd => (take(4)?, 0),
            0xde => (2 * take(2)?, 0),
            0xdf => (2 * take(4)?, 0),
            0xa0..=0xbf => (u64::MAX, u64::from(marker & 0x1f)),
            0xd9 | 0xc4 => (u64::MAX, take(1)?),
            0xda | 0xc5 => (u64::MAX, take(2)?),
            0xdb | 0xc6 => (u64::MAX, take(4)?),
            0xc7 => (u64::MAX, take(1)? + 1),
            0xc8 => (u64::MAX, take(2)? + 1),
            0xc9 => (u64::MAX, take(4)? + 1),
            0xd4 => (u64::MAX, 2),
            0xd5 => (u64::MAX, 3),
            0xd6 => (u64::MAX, 5),
            0xd7 => (u64::MAX, 9),
            0xd8 => (u64::MAX, 17),
            0xcc | 0xd0 => (u64::MAX, 1),
            0xcd | 0xd1 => (u64::MAX, 2),
            0xca | 0xce | 0xd2 => (u64::MAX, 4),
            0xcb | 0xcf | 0xd3 => (u64::MAX, 8),
            _ => (u64::MAX, 0),
        };
        if entries == u64::MAX {
            // A scalar: its bytes need not all be there for the reader to go on (it stops at the end).
            *at = at.saturating_add(usize::try_from(skip).unwrap_or(usize::MAX));
            return Ok(());
        }
        if open + 1 >= max {
            return Err(Stop::Deep);
        }
        for _ in 0..entries {
            if *at >= payload.len() {
                return Err(Stop::Bad);
            }
            reference(payload, at, open + 1, max)?;
        }
        Ok(())
    }

    /// A small random number generator (xorshift), seeded, so that a failure can be replayed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Writes a random valid MessagePack value of at most `depth` levels of maps and arrays, with
    /// every kind of marker.
    fn random_value(rng: &mut Rng, out: &mut Vec<u8>, depth: usize, ext: bool, exact: bool) {
        let be = |out: &mut Vec<u8>, n: u64, size: usize| {
            out.extend_from_slice(&n.to_be_bytes()[8 - size..]);
        };
        let kind = match (depth, exact) {
            (0, _) => rng.below(20),
            (_, true) => 20 + rng.below(8),
            _ => rng.below(28),
        };
        match kind {
            0 => out.push(rng.below(0x80) as u8),
            1 => out.push(0xe0 | rng.below(0x20) as u8),
            2 => out.push([0xc0, 0xc2, 0xc3][rng.below(3) as usize]),
            3 => {
                let (marker, size) = [
                    (0xcc, 1),
                    (0xcd, 2),
                    (0xce, 4),
                    (0xcf, 8),
                    (0xd0, 1),
                    (0xd1, 2),
                    (0xd2, 4),
                    (0xd3, 8),
                    (0xca, 4),
                    (0xcb, 8),
                ][rng.below(10) as usize];
                out.push(marker);
                for _ in 0..size {
                    // Bytes that would be markers of containers, were they read as such.
                    out.push([0xdd, 0xdf, 0x9f, 0x8f, 0xff][rng.below(5) as usize]);
                }
            }
            4..=9 => {
                let len = [rng.below(32), rng.below(300), rng.below(70_000)][rng.below(3) as usize]
                    as usize;
                let (marker, size) = match (kind, len) {
                    (4, 0..=31) => (0xa0 | len as u8, 0),
                    (4 | 5, 0..=255) => (0xd9, 1),
                    (4..=6, 0..=65_535) => (0xda, 2),
                    (4..=7, _) => (0xdb, 4),
                    (8, 0..=255) => (0xc4, 1),
                    (8 | 9, 0..=65_535) => (0xc5, 2),
                    _ => (0xc6, 4),
                };
                out.push(marker);
                be(out, len as u64, size);
                out.extend((0..len).map(|i| [0x91, 0xdc, 0x81, 0xde][i % 4]));
            }
            10..=11 if ext => {
                let len = [1usize, 2, 4, 8, 16, rng.below(300) as usize, 3][rng.below(7) as usize];
                match (kind, len) {
                    (10, 1) => out.push(0xd4),
                    (10, 2) => out.push(0xd5),
                    (10, 4) => out.push(0xd6),
                    (10, 8) => out.push(0xd7),
                    (10, 16) => out.push(0xd8),
                    (_, 0..=255) if rng.below(2) == 0 => {
                        out.push(0xc7);
                        be(out, len as u64, 1);
                    }
                    (_, 0..=65_535) if rng.below(2) == 0 => {
                        out.push(0xc8);
                        be(out, len as u64, 2);
                    }
                    _ => {
                        out.push(0xc9);
                        be(out, len as u64, 4);
                    }
                }
                out.push(rng.below(256) as u8);
                out.extend((0..len).map(|i| [0x91, 0xdd, 0x81][i % 3]));
            }
            10..=19 => out.push(rng.below(0x80) as u8),
            _ => {
                let map = rng.below(2) == 0;
                // Mostly one entry, to go deep; sometimes none, sometimes more.
                let entries = match exact {
                    true => [1, 1, 1, 2, 3, 20][rng.below(6) as usize],
                    false => [1, 1, 1, 0, 2, 3, 20][rng.below(7) as usize],
                };
                let form = rng.below(3);
                match (map, form, entries) {
                    (true, 0, 0..=15) => out.push(0x80 | entries as u8),
                    (false, 0, 0..=15) => out.push(0x90 | entries as u8),
                    (true, 1, _) => {
                        out.push(0xde);
                        be(out, entries, 2);
                    }
                    (false, 1, _) => {
                        out.push(0xdc);
                        be(out, entries, 2);
                    }
                    (true, _, _) => {
                        out.push(0xdf);
                        be(out, entries, 4);
                    }
                    (false, _, _) => {
                        out.push(0xdd);
                        be(out, entries, 4);
                    }
                }
                let values = if map { 2 * entries } else { entries };
                // One entry goes as deep as allowed, the others stay shallow.
                let deep = rng.below(values.max(1));
                for index in 0..values {
                    let depth = if index == deep {
                        depth - 1
                    } else {
                        rng.below(3).min(depth as u64 - 1) as usize
                    };
                    random_value(rng, out, depth, ext, exact && index == deep);
                }
            }
        }
    }

    #[test]
    fn nests_deeper_than_agrees_with_a_recursive_reader() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let verdict = |payload: &[u8], max: usize| {
            let mut at = 0;
            reference(payload, &mut at, 0, max) == Err(Stop::Deep)
        };
        let mut checked = 0;
        let mut deep_by_rmp = 0;
        for round in 0..400 {
            let mut payload = Vec::new();
            let depth = if round % 2 == 0 {
                rng.below(12) as usize
            } else {
                120 + rng.below(15) as usize
            };
            random_value(&mut rng, &mut payload, depth, round % 3 != 0, round % 4 < 2);
            // Trailing bytes: a second value, or garbage.
            if rng.below(2) == 0 {
                random_value(&mut rng, &mut payload, 3, true, false);
            }
            let mut variants = vec![payload.clone()];
            // Truncated, and with a byte changed.
            let cut = rng.below(payload.len() as u64 + 1) as usize;
            variants.push(payload[..cut].to_vec());
            let mut changed = payload.clone();
            let at = rng.below(changed.len() as u64) as usize;
            changed[at] = rng.below(256) as u8;
            variants.push(changed);
            variants.push((0..rng.below(400)).map(|_| rng.below(256) as u8).collect());
            for payload in &variants {
                for max in (1..=14).chain(118..=138) {
                    assert_eq!(
                        nests_deeper_than(payload, max),
                        verdict(payload, max),
                        "round {round} max {max}: {:02x?}",
                        &payload[..payload.len().min(400)]
                    );
                    checked += 1;
                }
            }
            // A valid value without extensions, against rmp-serde's own limit.
            if round % 3 == 0 {
                for max in [2, 5, 10, 127, 128, 129] {
                    let mut deserializer = rmp_serde::Deserializer::from_read_ref(&payload[..]);
                    deserializer.set_max_depth(max);
                    let by_rmp = serde::de::IgnoredAny::deserialize(&mut deserializer);
                    deep_by_rmp += usize::from(max == 128 && by_rmp.is_err());
                    assert_eq!(
                        matches!(by_rmp, Err(rmp_serde::decode::Error::DepthLimitExceeded)),
                        nests_deeper_than(&payload, max),
                        "round {round} max {max} {by_rmp:?}"
                    );
                    assert!(
                        matches!(
                            by_rmp,
                            Ok(_) | Err(rmp_serde::decode::Error::DepthLimitExceeded)
                        ),
                        "{by_rmp:?}"
                    );
                }
            }
        }
        assert!(checked > 50_000);
        // Some payloads went past the limit.
        assert!(deep_by_rmp > 5, "{deep_by_rmp}");
    }
}
