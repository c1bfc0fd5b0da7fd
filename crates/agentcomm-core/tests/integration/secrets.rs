//! "Credentials never appear in logs or `Debug` output": every URL form a password can take, in
//! `REDIS_URL`, `RABBITMQ_URL` or (by mistake) `MESSAGING_BACKEND`, printed through every path
//! agentcomm-core has for it (`redact_url`, `Debug` of the configuration, `Display` and `Debug` of
//! its errors, and a JSON log line with the error as a field): no piece of the secret may show.

use agentcomm_core::config::Config;
use agentcomm_core::error::redact_url;
use agentcomm_testkit::logs;

/// The pieces of every secret below: none of them may appear anywhere.
const PIECES: [&str; 3] = ["Qz7k", "Wm4p", "Xc5v"];

/// URLs holding a secret made of [`PIECES`], in every shape a redaction may misread.
fn redis_urls() -> Vec<String> {
    let mut urls = Vec::new();
    for password in [
        "Qz7kWm4pXc5v",
        // Percent-encoded '@', ':', '/', '?', '#'.
        "Qz7k%40Wm4p%3AXc5v",
        "Qz7k%2FWm4p%3FXc5v%23",
        // Unencoded '@', ':', '/', '?', '#'.
        "Qz7k@Wm4p@Xc5v",
        "Qz7k:Wm4p:Xc5v",
        "Qz7k/Wm4p/Xc5v",
        "Qz7k?Wm4p?Xc5v",
        "Qz7k#Wm4p#Xc5v",
        "Qz7k?Wm4p=Xc5v",
        "Qz7k/Wm4p?Xc5v#",
    ] {
        for template in [
            "redis://user:{}@cache:6379/0",
            "redis://:{}@cache:6379",
            "rediss://user:{}@[::1]:6380/2",
            "redis-cluster://user:{}@10.0.0.1:7000?node=10.0.0.2:7000&node=10.0.0.3:7000",
            "rediss-cluster://:{}@[fe80::1]:7000?node=[fe80::2]:7000",
            "redis-sentinel://user:{}@s1:26379,s2:26379/0?sentinelServiceName=main",
            "redis-sentinel://s1:26379,[::1]:26379/0?sentinelServiceName=main&sentinelPassword={}",
            "redis-sentinel://s1:26379/0?sentinelPassword={}&sentinelServiceName=main&node=s2:26379",
            "redis-sentinel://user:{}@s1:26379/0?sentinelServiceName=main&sentinelUsername=u&sentinelPassword={}",
            // A user name alone may itself be a token.
            "redis://{}@cache:6379/0",
            // Ports that do not parse: the URL is refused, its error shows it.
            "redis://user:{}@cache:99999/0",
            "redis://user:{}@cache:6379/notadb",
        ] {
            // In a lone user part, the text before a ':' is the user name, not a secret.
            if !(template.contains("//{}@") && password.contains(':')) {
                urls.push(template.replace("{}", password));
            }
        }
    }
    urls
}

fn amqp_urls() -> Vec<String> {
    let mut urls = Vec::new();
    for password in [
        "Qz7kWm4pXc5v",
        "Qz7k%40Wm4p%3AXc5v",
        "Qz7k@Wm4p@Xc5v",
        "Qz7k:Wm4p:Xc5v",
        "Qz7k/Wm4p/Xc5v",
        "Qz7k?Wm4p?Xc5v",
        "Qz7k#Wm4p#Xc5v",
    ] {
        for template in [
            "amqp://app:{}@mq:5672/%2f",
            "amqps://app:{}@[::1]:5671/prod?heartbeat=10",
            "amqp://{}@mq/prod",
            "amqp://app:{}@mq:99999/prod",
            "amqps://app:pw@mq/prod?certfile=/c.pem&keyfile=/k.pem&password={}",
        ] {
            if !(template.contains("//{}@") && password.contains(':')) {
                urls.push(template.replace("{}", password));
            }
        }
    }
    urls
}

/// Text that is not a URL at all (typos), holding the same secret.
fn mangled() -> Vec<String> {
    [
        "redis:/user:Qz7kWm4pXc5v@cache:6379/0",
        "redis//:Qz7kWm4pXc5v@cache:6379",
        "amqp:app:Qz7kWm4pXc5v@mq/prod",
        // The scheme forgotten, another URL in the query: the first "://" is not the scheme's.
        "user:Qz7kWm4pXc5v@cache:6379/0?client=http://proxy",
        ":Qz7kWm4pXc5v@cache:6379/0#see=https://docs",
        "app:Qz7kWm4pXc5v@mq:5672/prod?redirect=amqp://other",
    ]
    .map(String::from)
    .to_vec()
}

/// What a log line shows of `error` (as a `Display` field and as a `Debug` field).
fn logged(error: &agentcomm_core::Error) -> String {
    let ((), lines) = logs::capture(async {
        tracing::warn!(error = %error, debug = ?error, "configuration refused");
    });
    lines
}

/// Every text agentcomm-core shows of `url` read from `variable`.
fn shown(variable: &str, url: &str) -> Vec<(&'static str, String)> {
    let mut texts = vec![("redact_url", redact_url(url))];
    let lookup = |name: &str| (name == variable).then(|| url.to_string());
    match Config::from_lookup(lookup) {
        Ok(config) => texts.push(("Config Debug", format!("{config:?}"))),
        Err(error) => {
            texts.push(("error Display", error.to_string()));
            texts.push(("error Debug", format!("{error:?}")));
            texts.push(("log line", logged(&error)));
        }
    }
    texts
}

fn leaks(variable: &str, urls: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for url in urls {
        let subject = format!("{variable}={url:?}");
        found.extend(logs::leaks(&subject, &PIECES, &shown(variable, url)));
    }
    found
}

#[test]
fn no_redis_url_shows_its_password_through_core() {
    let found = leaks("REDIS_URL", &redis_urls());
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn no_rabbitmq_url_shows_its_password_through_core() {
    let found = leaks("RABBITMQ_URL", &amqp_urls());
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn a_url_in_the_backend_variable_shows_no_password() {
    let mut urls = redis_urls();
    urls.extend(amqp_urls());
    let found = leaks("MESSAGING_BACKEND", &urls);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// Text that is not a URL, whose first "://" comes after the secret (a URL without its scheme with
/// another URL in its query), was shown whole: `redact_url` took everything before that "://" for
/// the scheme, and `check_url` named it as "the scheme '...' is not supported".
#[test]
fn a_mangled_url_shows_no_password() {
    let mut found = Vec::new();
    for variable in ["REDIS_URL", "RABBITMQ_URL", "MESSAGING_BACKEND"] {
        found.extend(leaks(variable, &mangled()));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A password without a user name (`redis://:password@host`, the usual Redis form) that starts with
/// digits followed by a '?' and what reads as a secret parameter (`48271?token=...`): the digits
/// were shown, taken for the port of an empty host (`redis://:48271?token=***`).
#[test]
fn the_digits_of_a_password_are_not_taken_for_a_port_without_a_host() {
    let mut found = Vec::new();
    for url in [
        "redis://:48271?token=Qz7k@cache:6379/0",
        "rediss://:48271?password=Qz7k@[::1]:6380",
        "redis-sentinel://:48271?sentinelPassword=Qz7k@s1:26379/0?sentinelServiceName=m",
        "amqp://:48271?password=Qz7k@mq/prod",
    ] {
        for variable in ["REDIS_URL", "RABBITMQ_URL"] {
            let subject = format!("{variable}={url:?}");
            found.extend(logs::leaks(
                &subject,
                &["48271", "Qz7k"],
                &shown(variable, url),
            ));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A URL pasted with quotes, brackets or its variable's name around it (a docker-compose
/// `- REDIS_URL="redis://..."` keeps its quotes; `REDIS_URL=REDIS_URL=...`) was hidden whole (`***`)
/// and refused as "it does not start with a scheme", which it seems to: the user saw neither the host
/// nor what to remove. It shows as before those were hidden, without the password, and the error
/// names what to remove.
#[test]
fn a_url_with_quotes_or_its_name_around_it_shows_its_host_and_what_to_remove() {
    for (variable, url, value, fix) in [
        (
            "REDIS_URL",
            "\"redis://:Qz7kWm4pXc5v@cache:6379/2\"",
            "\"redis://:***@cache:6379/2\"",
            "it must start with 'redis://': remove '\"' before 'redis' (and any closing quote or bracket)",
        ),
        (
            "REDIS_URL",
            "'rediss-sentinel://s1:26379,[::1]:26379/0?sentinelServiceName=m&sentinelPassword=Qz7k@Wm4p'",
            "'rediss-sentinel://s1:26379,[::1]:26379/0?sentinelServiceName=m&sentinelPassword=***",
            "remove ''' before 'rediss-sentinel'",
        ),
        (
            "REDIS_URL",
            "REDIS_URL=redis://user:Qz7k@Wm4p@cache:6379",
            "REDIS_URL=redis://user:***@cache:6379",
            "remove 'REDIS_URL=' before 'redis'",
        ),
        (
            "RABBITMQ_URL",
            "<amqps://app:Qz7kWm4pXc5v@mq:5671/prod?heartbeat=10>",
            "<amqps://app:***@mq:5671/prod?heartbeat=10>",
            "remove '<' before 'amqps'",
        ),
        (
            "RABBITMQ_URL",
            "amqp ://app:Qz7kWm4pXc5v@mq/%2f",
            "amqp ://app:***@mq/%2f",
            "remove the space between the scheme and '://'",
        ),
    ] {
        let lookup = |name: &str| (name == variable).then(|| url.to_string());
        let error = Config::from_lookup(lookup).expect_err(url);
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("{variable}='{value}' is not valid: ")),
            "{text}"
        );
        assert!(text.contains(fix), "{text}");
        assert_eq!(redact_url(url), value);
    }
    // Text before the "://" that may hold a secret is still no scheme: hidden, and not named.
    for url in [
        "user:Qz7kWm4pXc5v@cache:6379/0?client=http://proxy",
        ":Qz7k@h REDIS_URL=redis://cache:6379",
        "u:Qz7k@h=redis://cache:6379",
        "\":Qz7k@h\"://cache",
        "redis_url=:Qz7k@cache://cache",
    ] {
        let found = leaks("REDIS_URL", &[url.to_string()]);
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}

/// A URL whose host was forgotten (`redis://:password`, `amqp://guest:password`: what is left of the
/// user part reads as a host and a port that is no number) was refused with the password shown whole:
/// "REDIS_URL='redis://:Qz7kWm4pXc5v' is not valid: the host is missing".
#[test]
fn a_url_without_its_host_shows_no_password() {
    let mut found = Vec::new();
    for password in [
        "Qz7kWm4pXc5v",
        "Qz7k%40Wm4p%3AXc5v",
        "Qz7k:Wm4p:Xc5v",
        "Qz7k/Wm4p/Xc5v",
        "Qz7k#Wm4p#Xc5v",
    ] {
        for (variable, template) in [
            ("REDIS_URL", "redis://:{}"),
            ("REDIS_URL", "redis://user:{}"),
            ("REDIS_URL", "rediss://user:{}/0"),
            ("RABBITMQ_URL", "amqp://guest:{}"),
            ("RABBITMQ_URL", "amqps://app:{}/prod"),
        ] {
            let url = template.replace("{}", password);
            found.extend(leaks(variable, std::slice::from_ref(&url)));
            found.extend(leaks("MESSAGING_BACKEND", &[url]));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    // The error still says what is wrong.
    let error =
        Config::from_lookup(|name| (name == "REDIS_URL").then(|| "redis://:Qz7kWm4pXc5v".into()))
            .unwrap_err()
            .to_string();
    assert!(
        error.starts_with("REDIS_URL='redis://:***' is not valid: the host is missing"),
        "{error}"
    );
    // A host with a port, or none, is shown as it was.
    for url in [
        "redis://cache:6379/0",
        "redis://cache",
        "unix:///run/redis.sock",
        "amqp://mq/%2f",
    ] {
        assert_eq!(redact_url(url), url);
    }
}

/// A URL without a password, with quotes or brackets left around it (docker-compose keeps the quotes
/// of `- REDIS_URL="redis://cache:6379"`) or a trailing space, and no path: the closing quote was read
/// into the port, and the URL was hidden whole (`"redis://***`), so the error told the user to remove
/// the quote but no longer showed which host they had set. It shows as written.
#[test]
fn a_url_without_a_password_in_quotes_still_shows_its_host() {
    for url in [
        "\"redis://cache:6379\"",
        "'redis://cache:6379'",
        "<amqp://mq:5672>",
        "(redis://cache:6379)",
        "redis://cache:6379 ",
    ] {
        assert_eq!(redact_url(url), url);
    }
    let error =
        Config::from_lookup(|name| (name == "REDIS_URL").then(|| "\"redis://cache:6379\"".into()))
            .unwrap_err()
            .to_string();
    assert!(
        error.starts_with("REDIS_URL='\"redis://cache:6379\"' is not valid: "),
        "{error}"
    );
    // A password left without its host, in quotes, is still hidden.
    for url in [
        "\"redis://:Qz7kWm4pXc5v\"",
        "'amqp://guest:Qz7kWm4pXc5v'",
        "<redis://user:Qz7k:Wm4p>",
    ] {
        let found = leaks("REDIS_URL", &[url.to_string()]);
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}

/// A URL whose host was forgotten, with a password of digits that ends in a closing quote or bracket
/// and nothing opened before the scheme (`amqp://guest:2024)`): aa091d0 dropped that closing character
/// before reading the rest as `host:port`, so the password read as a port and the URL was shown
/// whole. The closing character is dropped only when its opening one comes before the scheme.
#[test]
fn a_password_of_digits_ending_in_a_closing_character_is_hidden() {
    for (url, shown) in [
        ("amqp://guest:2024)", "amqp://guest:***"),
        ("redis://admin:8675309\"", "redis://admin:***"),
        ("amqp://guest:31337>", "amqp://guest:***"),
        ("redis://admin:4711'", "redis://admin:***"),
        // Opened before the scheme: the URL's own wrapping, shown.
        ("(amqp://mq:5672)", "(amqp://mq:5672)"),
        (
            "REDIS_URL='redis://cache:6379'",
            "REDIS_URL='redis://cache:6379'",
        ),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}
