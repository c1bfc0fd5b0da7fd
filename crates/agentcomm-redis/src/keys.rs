//! How agentcomm names things in Redis. Every name starts with the router's prefix (`agentcomm` by
//! default), so that several systems, or tests, can share one Redis without seeing each other.
//!
//! | what | name |
//! |---|---|
//! | pub/sub channel | `<prefix>:<channel name>` (the name the message type's template renders) |
//! | stream of one message class | `<prefix>:stream:{<class>}` |
//! | a publisher's highest sequence number on a stream | `<prefix>:dedup:{<class>}:<publisher id>` |
//! | registry of the classes that have a stream | `<prefix>:streams` |
//! | patterns of each member of a consumer group | `<prefix>:group:<group>:members` (a hash) |
//! | marker of a malformed frame already dead-lettered | `<prefix>:malformed:<hash>` (1 h) |
//!
//! The braces are Redis Cluster hash tags: a class's stream and its publishers' marks hash to the same
//! slot, so the publish script may touch both; different classes spread over the cluster
//! (unless the prefix has a hash tag of its own: see [`check_prefix`]).

use agentcomm_core::channel::{Channel, ChannelPattern};

/// The names of one router's keys and channels.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pub/sub channel a message on `channel` is published to.
    pub(crate) fn pubsub_channel(&self, channel: &Channel) -> String {
        format!("{}:{}", self.prefix, channel.name())
    }

    /// What to subscribe to for `pattern`: an exact channel, or a glob.
    ///
    /// A pattern with a wildcard class cannot know the templates of the classes it will match, so it
    /// subscribes to everything under the prefix; what arrives is filtered with
    /// [`ChannelPattern::matches`] in any case.
    pub(crate) fn pubsub_subscription(&self, pattern: &ChannelPattern) -> RedisSubscription {
        if let (Some(class), Some(direction), Some(session)) =
            (pattern.class(), pattern.direction(), pattern.session())
        {
            let name = pattern.template().render(class, direction, session);
            return RedisSubscription::Channel(format!("{}:{name}", self.prefix));
        }
        let prefix = glob_escape(&self.prefix);
        if pattern.class().is_none() {
            return RedisSubscription::Pattern(format!("{prefix}:*"));
        }
        RedisSubscription::Pattern(format!("{prefix}:{}", pattern.render("*", glob_escape)))
    }

    /// The stream of message class `class`.
    pub(crate) fn stream(&self, class: &str) -> String {
        format!("{}:stream:{{{class}}}", self.prefix)
    }

    /// The highest sequence number one publisher stored on the stream of `class`.
    pub(crate) fn dedup(&self, class: &str, publisher: &str) -> String {
        format!("{}:dedup:{{{class}}}:{publisher}", self.prefix)
    }

    /// The set of classes that have a stream.
    pub(crate) fn registry(&self) -> String {
        format!("{}:streams", self.prefix)
    }

    /// The patterns each member of `group` subscribed with (a hash: consumer name to patterns).
    pub(crate) fn group_members(&self, group: &str) -> String {
        format!("{}:group:{group}:members", self.prefix)
    }

    /// The marker saying a malformed frame was dead-lettered already.
    pub(crate) fn malformed_marker(&self, hash: &str) -> String {
        format!("{}:malformed:{hash}", self.prefix)
    }
}

/// Checks a router's prefix. Redis Cluster hashes a key by the text between its first `{` and the next
/// `}` (the whole key when nothing is between them). A prefix without `{` leaves that to the `{<class>}`
/// tag; a prefix with a tag of its own (`{tenant}`) puts every key of the router in one slot. Both keep
/// a class's stream and its publishers' marks (`<prefix>:stream:{A}`, `<prefix>:dedup:{A}:..`) in one
/// slot. Any other `{` (`a{b`, `{}`) makes them hash to different slots: the publish script, which
/// touches both, would fail with `CROSSSLOT`.
pub(crate) fn check_prefix(prefix: &str) -> agentcomm_core::error::Result<()> {
    // An empty prefix is no "no prefix": every key and channel would start with a bare ':'
    // (`:stream:{A}`, `:A:event:s1`), which no other program expects.
    if prefix.is_empty() {
        return Err(agentcomm_core::error::Error::Config {
            variable: "Redis key prefix".into(),
            value: String::new(),
            expected: "a non-empty prefix (every key and channel would start with a bare ':'): \
                       keep the default `agentcomm`, or name the application"
                .into(),
        });
    }
    let Some(open) = prefix.find('{') else {
        return Ok(());
    };
    match prefix[open + 1..].find('}') {
        Some(between) if between > 0 => Ok(()),
        _ => Err(agentcomm_core::error::Error::Config {
            variable: "Redis key prefix".into(),
            value: prefix.to_string(),
            expected: "a prefix without '{', or whose first '{' closes with a '}' after some \
                       text (a hash tag of its own, `{tenant}`: every key in one slot); another \
                       '{' would take the place of the Redis Cluster hash tag agentcomm puts in \
                       its keys (`{<class>}`), and a class's stream and its marks would hash to \
                       different slots"
                .into(),
        }),
    }
}

/// One Redis-level subscription.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum RedisSubscription {
    /// `SUBSCRIBE` to one channel.
    Channel(String),
    /// `PSUBSCRIBE` to a glob.
    Pattern(String),
}

/// Escapes the characters Redis globs give a meaning to.
pub(crate) fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentcomm_core::channel::parse_channel;

    #[test]
    fn names_carry_the_prefix_and_hash_tags() {
        let keys = Keys::new("test-1");
        let channel = parse_channel("PaymentRequest:request:s1").unwrap();
        assert_eq!(
            keys.pubsub_channel(&channel),
            "test-1:PaymentRequest:request:s1"
        );
        assert_eq!(
            keys.stream("PaymentRequest"),
            "test-1:stream:{PaymentRequest}"
        );
        assert_eq!(
            keys.dedup("PaymentRequest", "ab12"),
            "test-1:dedup:{PaymentRequest}:ab12"
        );
    }

    #[test]
    fn refused_prefixes_say_why_in_one_readable_sentence() {
        for prefix in ["", "a{b", "{}"] {
            let error = check_prefix(prefix).unwrap_err();
            assert!(
                matches!(error, agentcomm_core::error::Error::Config { .. }),
                "{prefix:?}: {error:?}"
            );
            let text = error.to_string();
            assert!(
                !text.contains("  "),
                "{prefix:?}: a run of spaces in {text:?}"
            );
        }
        assert!(
            check_prefix("")
                .unwrap_err()
                .to_string()
                .contains("non-empty")
        );
        for prefix in ["agentcomm", "{tenant}", "a:b", "tests-echo-1"] {
            check_prefix(prefix).unwrap();
        }
    }

    #[test]
    fn patterns_become_channels_or_globs() {
        let keys = Keys::new("a*b");
        let exact = ChannelPattern::parse("Ping:event:s1").unwrap();
        assert_eq!(
            keys.pubsub_subscription(&exact),
            RedisSubscription::Channel("a*b:Ping:event:s1".into())
        );
        let by_class = ChannelPattern::parse("Ping:*:s[1]").unwrap();
        assert_eq!(
            keys.pubsub_subscription(&by_class),
            RedisSubscription::Pattern("a\\*b:Ping:*:s\\[1\\]".into())
        );
        let any_class = ChannelPattern::parse("*:request:s1").unwrap();
        assert_eq!(
            keys.pubsub_subscription(&any_class),
            RedisSubscription::Pattern("a\\*b:*".into())
        );
    }
}
