//! How agentcomm channels map onto RabbitMQ: routing keys, binding keys, queue names, retry buckets.
//!
//! - One durable **topic exchange** (`agentcomm` by default) carries every message.
//! - A channel `class:direction:session` is published with the routing key `class.direction.session`,
//!   each component escaped ([`escape_component`]) so that the `.`, `*` and `#` AMQP gives a meaning to
//!   cannot split or widen it. The message type's channel template does not change the key: patterns
//!   match components ([`ChannelPattern::matches`]), so the key is made of the components.
//! - A pattern becomes a binding key with `*` for each wildcard component: `PaymentRequest:*:*` binds
//!   `PaymentRequest.*.*`.
//!
//! ```
//! use agentcomm_core::{ChannelPattern, parse_channel};
//! use agentcomm_amqp::topology::{binding_key, routing_key, split_routing_key};
//!
//! let channel = parse_channel("billing.Payment:request:s#1")?;
//! let key = routing_key(&channel)?;
//! assert_eq!(key, "billing%2EPayment.request.s%231");
//! assert_eq!(
//!     split_routing_key(&key),
//!     Some(["billing.Payment".to_string(), "request".to_string(), "s#1".to_string()])
//! );
//! assert_eq!(binding_key(&ChannelPattern::parse("*:request:*")?)?, "*.request.*");
//! # Ok::<(), agentcomm_core::Error>(())
//! ```

use std::time::Duration;

use agentcomm_core::channel::{Channel, ChannelPattern, MAX_COMPONENT_LEN};
use agentcomm_core::error::{Error, Result};

/// The longest routing key, binding key or queue name AMQP allows, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The longest exchange name this crate accepts, in bytes: queue names are built from it.
pub const MAX_EXCHANGE_LEN: usize = 64;

/// The longest group name this crate accepts, in bytes: the group's queue and its retry queues must
/// stay within [`MAX_NAME_LEN`].
pub const MAX_GROUP_LEN: usize = 120;

/// The binding key of the dead-letter queue on the main exchange: every `DeadLetter:<class>:<session>`.
pub const DEAD_LETTER_BINDING: &str = "DeadLetter.*.*";

/// Escapes one channel component for a routing or binding key: `%` → `%25`, `.` → `%2E`,
/// `*` → `%2A`, `#` → `%23`; every other character is kept. The mapping is injective (percent-encoding
/// of a set that includes `%`), so two different components never share a key.
pub fn escape_component(component: &str) -> String {
    let mut escaped = String::with_capacity(component.len() + 8);
    push_escaped(&mut escaped, component);
    escaped
}

/// Appends `component`, escaped, to `key`.
fn push_escaped(key: &mut String, component: &str) {
    // A byte scan: the four characters are ASCII, and this runs for every publish.
    if !component
        .bytes()
        .any(|b| matches!(b, b'%' | b'.' | b'*' | b'#'))
    {
        key.push_str(component);
        return;
    }
    for c in component.chars() {
        match c {
            '%' => key.push_str("%25"),
            '.' => key.push_str("%2E"),
            '*' => key.push_str("%2A"),
            '#' => key.push_str("%23"),
            other => key.push(other),
        }
    }
}

/// Reverses [`escape_component`]; `None` when `escaped` is not the output of it.
pub fn unescape_component(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(index) = rest.find('%') {
        out.push_str(&rest[..index]);
        let code = rest.get(index + 1..index + 3)?;
        out.push(match code {
            "25" => '%',
            "2E" => '.',
            "2A" => '*',
            "23" => '#',
            _ => return None,
        });
        rest = &rest[index + 3..];
    }
    if rest.contains(['.', '*', '#']) {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

fn check_key_len(key: String, what: &str, source: &str) -> Result<String> {
    if key.len() > MAX_NAME_LEN {
        return Err(Error::Backend {
            backend: crate::link::BACKEND,
            message: format!(
                "the {what} of '{source}' would be {} bytes once escaped, more than the {MAX_NAME_LEN} AMQP allows \
                 (each '.', '#' or '%' in a component takes 3 bytes, components may be {MAX_COMPONENT_LEN} bytes); \
                 use shorter class, direction or session names, or fewer of those characters",
                key.len()
            ),
        });
    }
    Ok(key)
}

/// The routing key a channel is published with: `class.direction.session`, each component escaped.
/// Fails when the escaped key would exceed 255 bytes.
pub fn routing_key(channel: &Channel) -> Result<String> {
    let (class, direction, session) = (channel.class(), channel.direction(), channel.session());
    let mut key = String::with_capacity(class.len() + direction.len() + session.len() + 2);
    push_escaped(&mut key, class);
    key.push('.');
    push_escaped(&mut key, direction);
    key.push('.');
    push_escaped(&mut key, session);
    check_key_len(key, "routing key", channel.name())
}

/// The binding key of a pattern: each fixed component escaped, each wildcard `*`.
pub fn binding_key(pattern: &ChannelPattern) -> Result<String> {
    let part =
        |component: Option<&str>| component.map_or_else(|| "*".to_string(), escape_component);
    let key = format!(
        "{}.{}.{}",
        part(pattern.class()),
        part(pattern.direction()),
        part(pattern.session())
    );
    check_key_len(key, "binding key", &pattern.to_string())
}

/// Splits a routing key made by [`routing_key`] back into `[class, direction, session]`.
pub fn split_routing_key(key: &str) -> Option<[String; 3]> {
    let mut parts = key.split('.');
    let (Some(class), Some(direction), Some(session), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some([
        unescape_component(class)?,
        unescape_component(direction)?,
        unescape_component(session)?,
    ])
}

/// The durable queue shared by the members of `group` on `exchange`: `<exchange>.group.<group>`.
pub fn group_queue(exchange: &str, group: &str) -> String {
    format!("{exchange}.group.{group}")
}

/// The queue of one fan-out subscription: `<exchange>.fanout.<unique id>`.
pub fn fan_out_queue(exchange: &str) -> String {
    format!("{exchange}.fanout.{}", uuid::Uuid::now_v7().simple())
}

/// The retry queue holding messages of `queue` for `ttl_ms` before they dead-letter back to it.
pub fn retry_queue(queue: &str, ttl_ms: u64) -> String {
    format!("{queue}.retry.{ttl_ms}ms")
}

/// The delays retry queues exist for, per decade: a retry waits for the nearest one (within about
/// ±25%) so that a few queues serve every backoff, jitter included.
const BUCKET_STEPS: [f64; 6] = [1.0, 1.5, 2.0, 3.0, 5.0, 7.0];

/// The longest retry delay: longer ones wait this long (24 days, under the 32-bit TTL limit).
pub const MAX_RETRY_DELAY: Duration = Duration::from_millis(2_000_000_000);

/// The retry bucket of `delay`, in milliseconds: 0 (redeliver at once) below 1 ms, otherwise the
/// nearest of 1, 1.5, 2, 3, 5, 7 × 10ⁿ ms.
///
/// ```
/// use std::time::Duration;
/// use agentcomm_amqp::topology::retry_bucket_ms;
///
/// assert_eq!(retry_bucket_ms(Duration::ZERO), 0);
/// assert_eq!(retry_bucket_ms(Duration::from_millis(100)), 100);
/// assert_eq!(retry_bucket_ms(Duration::from_millis(180)), 200);
/// assert_eq!(retry_bucket_ms(Duration::from_millis(1100)), 1000);
/// assert_eq!(retry_bucket_ms(Duration::from_secs(26)), 30_000);
/// ```
pub fn retry_bucket_ms(delay: Duration) -> u64 {
    let delay = delay.min(MAX_RETRY_DELAY);
    let ms = delay.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return 0;
    }
    let decade = 10f64.powi(ms.log10().floor() as i32);
    let mut best = BUCKET_STEPS[0] * decade;
    for candidate in BUCKET_STEPS
        .iter()
        .map(|step| step * decade)
        .chain([10.0 * decade])
    {
        if (candidate.ln() - ms.ln()).abs() < (best.ln() - ms.ln()).abs() {
            best = candidate;
        }
    }
    (best.round() as u64).min(MAX_RETRY_DELAY.as_millis() as u64)
}

/// Checks an exchange name: 1 to 64 bytes of letters, digits, `-`, `_`, `.`, `:`, not starting with
/// the reserved `amq.`.
pub fn check_exchange_name(name: &str) -> Result<()> {
    let fail = |expected: &str| Error::Config {
        variable: "exchange".into(),
        value: name.to_string(),
        expected: expected.to_string(),
    };
    if name.is_empty() || name.len() > MAX_EXCHANGE_LEN {
        return Err(fail(&format!("1 to {MAX_EXCHANGE_LEN} bytes")));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(fail("only letters, digits, '-', '_', '.' and ':'"));
    }
    if name.starts_with("amq.") {
        return Err(fail(
            "a name that does not start with 'amq.' (reserved by RabbitMQ)",
        ));
    }
    Ok(())
}

/// Checks a queue name given by the user (dead-letter queue): 1 to 200 bytes, no control characters,
/// not starting with `amq.`.
pub fn check_queue_name(variable: &str, name: &str) -> Result<()> {
    let fail = |expected: &str| Error::Config {
        variable: variable.to_string(),
        value: name.to_string(),
        expected: expected.to_string(),
    };
    if name.is_empty() || name.len() > 200 {
        return Err(fail("1 to 200 bytes"));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(fail("a name without whitespace or control characters"));
    }
    if name.starts_with("amq.") {
        return Err(fail(
            "a name that does not start with 'amq.' (reserved by RabbitMQ)",
        ));
    }
    Ok(())
}

/// Checks a group name for use as a queue name (the core already refuses whitespace).
pub fn check_group_name(group: &str) -> Result<()> {
    if group.len() > MAX_GROUP_LEN {
        return Err(Error::Config {
            variable: "group".into(),
            value: group.to_string(),
            expected: format!(
                "at most {MAX_GROUP_LEN} bytes (it names a RabbitMQ queue, limited to {MAX_NAME_LEN})"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentcomm_core::parse_channel;

    #[test]
    fn escaping_is_reversible_and_injective() {
        let samples = [
            "a", "a.b", "a%2Eb", "%", "%25", "#", "a#b.c", "..", "x%y", "é.ü", "2E", "%2",
        ];
        let mut seen = std::collections::HashSet::new();
        for sample in samples {
            let escaped = escape_component(sample);
            assert!(!escaped.contains(['.', '*', '#']), "{sample} -> {escaped}");
            assert_eq!(unescape_component(&escaped).as_deref(), Some(sample));
            assert!(seen.insert(escaped), "two components share a key: {sample}");
        }
        assert_eq!(unescape_component("a.b"), None);
        assert_eq!(unescape_component("%zz"), None);
        assert_eq!(unescape_component("%2"), None);
    }

    #[test]
    fn keys_fit_in_255_bytes_or_fail_clearly() {
        let long = "x".repeat(MAX_COMPONENT_LEN);
        let channel = Channel::new(&long, &long, &long).unwrap();
        assert_eq!(
            routing_key(&channel).unwrap().len(),
            3 * MAX_COMPONENT_LEN + 2
        );

        let dotted = ".".repeat(MAX_COMPONENT_LEN);
        let channel = Channel::new(&dotted, "request", &dotted).unwrap();
        let error = routing_key(&channel).unwrap_err().to_string();
        assert!(error.contains("more than the 255 AMQP allows"), "{error}");
        assert!(error.contains("use shorter"), "{error}");

        let pattern = ChannelPattern::with_template(
            ChannelPattern::all().template(),
            None,
            Some(&dotted),
            Some(&dotted),
        )
        .unwrap();
        assert!(binding_key(&pattern).is_err());
        let pattern = ChannelPattern::parse("A:*:*").unwrap();
        assert_eq!(binding_key(&pattern).unwrap(), "A.*.*");
    }

    #[test]
    fn dead_letter_channels_reach_the_dead_letter_binding() {
        let channel = parse_channel("Payment:request:s1").unwrap().dead_letter();
        assert_eq!(routing_key(&channel).unwrap(), "DeadLetter.Payment.s1");
        let malformed = agentcomm_core::Envelope::malformed(&b"\x00"[..], "q", "bad");
        assert_eq!(
            routing_key(malformed.channel()).unwrap(),
            "DeadLetter.agentcomm%2EMalformed.unknown"
        );
    }

    #[test]
    fn retry_buckets_stay_near_the_delay() {
        for ms in [1u64, 3, 7, 12, 95, 140, 333, 999, 4_100, 29_000, 600_000] {
            let bucket = retry_bucket_ms(Duration::from_millis(ms)) as f64;
            let ratio = bucket / ms as f64;
            assert!((0.7..=1.35).contains(&ratio), "{ms} ms -> {bucket} ms");
        }
        assert_eq!(retry_bucket_ms(Duration::from_micros(300)), 0);
        assert_eq!(
            retry_bucket_ms(Duration::from_secs(100 * 24 * 3600)),
            MAX_RETRY_DELAY.as_millis() as u64
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_exchange_name("agentcomm").is_ok());
        assert!(check_exchange_name("amq.topic").is_err());
        assert!(check_exchange_name("with space").is_err());
        assert!(check_exchange_name(&"x".repeat(65)).is_err());
        assert!(check_group_name(&"g".repeat(MAX_GROUP_LEN)).is_ok());
        let queue = group_queue(&"x".repeat(MAX_EXCHANGE_LEN), &"g".repeat(MAX_GROUP_LEN));
        assert!(retry_queue(&queue, MAX_RETRY_DELAY.as_millis() as u64).len() <= MAX_NAME_LEN);
        assert!(check_group_name(&"g".repeat(MAX_GROUP_LEN + 1)).is_err());
    }
}
