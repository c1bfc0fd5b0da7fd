//! The scenarios. Each returns a one-line summary of what it checked, or a failure that says what was
//! lost, duplicated, reordered or wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::Agent;
use agentcomm_core::backoff::Backoff;
use agentcomm_core::channel::{Channel, ChannelPattern};
use agentcomm_core::codec::{BINARY_CONTENT_TYPE, Codec, JSON_CONTENT_TYPE, MSGPACK_CONTENT_TYPE};
use agentcomm_core::envelope::{Envelope, MALFORMED_CLASS, headers};
use agentcomm_core::error::Error;
use agentcomm_core::message::Message;
use agentcomm_core::router::{
    Delivery, HealthStatus, NackAction, PublishOutcome, SharedRouter, SubscribeOptions,
    Subscription,
};
use agentcomm_core::runtime::{AgentOptions, AgentState, Runtime};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::Scenario;
use super::agents::{
    EchoAgent, EchoRequest, EchoResponse, FailingAgent, GatedAgent, GatedEchoAgent, Templated,
    TemplatedEchoAgent, TemplatedEchoRequest, TemplatedEchoResponse, Work, Worker,
};
use super::support::{
    Context, During, Failure, Feeder, Outcome, RUN_HEADER, SEQ_HEADER, STREAM_HEADER, Settle, Sink,
    bounded, describe_capabilities, fail, failures, key_of, pattern_bytes,
};
use crate::tally::{Key, Tally, TallyReport};

pub async fn run(scenario: Scenario, ctx: &Context<'_>) -> Outcome {
    match scenario {
        Scenario::DeclaredCapabilities => declared_capabilities(ctx).await,
        Scenario::EnvelopeFields => envelope_fields(ctx).await,
        Scenario::PatternSubscriptions => pattern_subscriptions(ctx).await,
        Scenario::CustomTemplates => custom_templates(ctx).await,
        Scenario::Isolation => isolation(ctx).await,
        Scenario::ConcurrentPublishers => concurrent_publishers(ctx).await,
        Scenario::ManyChannels => many_channels(ctx).await,
        Scenario::OrderPerChannel => order_per_channel(ctx).await,
        Scenario::NackRedelivery => nack_redelivery(ctx).await,
        Scenario::DeadLetterAfterMaxAttempts => dead_letter_after_max_attempts(ctx).await,
        Scenario::GroupSplitsWork => group_splits_work(ctx).await,
        Scenario::TwoGroups => two_groups(ctx).await,
        Scenario::CloseWhileInFlight => close_while_in_flight(ctx).await,
        Scenario::ResubscribeLoops => resubscribe_loops(ctx).await,
        Scenario::PublisherClose => publisher_close(ctx).await,
        Scenario::LargePayloads => large_payloads(ctx).await,
        Scenario::BatchPublish => batch_publish(ctx).await,
        Scenario::MalformedPayloads => malformed_payloads(ctx).await,
        Scenario::MalformedFrames => malformed_frames(ctx).await,
        Scenario::GracefulShutdown => graceful_shutdown(ctx).await,
        Scenario::RequestReply => request_reply(ctx).await,
        Scenario::RequestFailures => request_failures(ctx).await,
        Scenario::RequestsAcrossACut => requests_across_a_cut(ctx).await,
        Scenario::PersistentWithoutConsumer => persistent_without_consumer(ctx).await,
        Scenario::Unroutable => unroutable(ctx).await,
        Scenario::CloseRefusesFurtherUse => close_refuses_further_use(ctx).await,
        Scenario::CloseTwiceOrCutShort => close_twice_or_cut_short(ctx).await,
        Scenario::PublishConfirms => publish_confirms(ctx).await,
    }
}

// ----- helpers -----------------------------------------------------------------------------------

fn pattern(text: &str) -> Outcome<ChannelPattern> {
    ChannelPattern::parse(text).during(format!("parsing the pattern {text}"))
}

fn exact(channel: &Channel) -> Outcome<ChannelPattern> {
    ChannelPattern::with_template(
        agentcomm_core::channel::ChannelTemplate::DEFAULT,
        Some(channel.class()),
        Some(channel.direction()),
        Some(channel.session()),
    )
    .during(format!("building the pattern of {channel}"))
}

async fn subscribe(
    ctx: &Context<'_>,
    connection: &SharedRouter,
    options: SubscribeOptions,
) -> Outcome<Subscription> {
    let what = format!(
        "subscribing ({:?} on {})",
        options.distribution,
        options
            .patterns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    ctx.phase(&what);
    bounded(ctx.wait, &what, connection.subscribe(options))
        .await?
        .during(&what)
}

/// Subscribes and feeds the deliveries into `sink` as `member`.
async fn feed(
    ctx: &Context<'_>,
    connection: &SharedRouter,
    options: SubscribeOptions,
    sink: &Arc<Sink>,
    member: usize,
    settle: Settle,
) -> Outcome<Feeder> {
    let subscription = subscribe(ctx, connection, options).await?;
    Ok(Feeder::start(subscription, sink, member, settle))
}

async fn publish_one(
    ctx: &Context<'_>,
    connection: &SharedRouter,
    envelope: Envelope,
) -> Outcome<PublishOutcome> {
    let what = format!("publishing to {}", envelope.channel());
    ctx.phase(&what);
    bounded(ctx.wait, &what, connection.publish(envelope))
        .await?
        .during(&what)
}

/// Publishes each batch in its own task, its messages one after the other (each publish awaited, so
/// a batch's order is its publisher's order); publisher `i` uses connection `i % connections.len()`.
/// Every publish must succeed and be routable.
fn spawn_publishers(
    connections: &[SharedRouter],
    batches: Vec<Vec<Envelope>>,
    limit: Duration,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let connections = connections.to_vec();
    tokio::spawn(async move {
        let tasks: Vec<_> = batches
            .into_iter()
            .enumerate()
            .map(|(publisher, batch)| {
                let connection = connections[publisher % connections.len()].clone();
                tokio::spawn(async move {
                    for envelope in batch {
                        let channel = envelope.channel().to_string();
                        match tokio::time::timeout(limit, connection.publish(envelope)).await {
                            Ok(Ok(outcome)) if outcome.is_unroutable() => {
                                return Err(format!(
                                    "publisher {publisher}: a publish to {channel} was reported unroutable \
                                     although a subscription matches it"
                                ));
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(error)) => {
                                return Err(format!(
                                    "publisher {publisher}: publishing to {channel} failed: {error}"
                                ));
                            }
                            Err(_) => {
                                return Err(format!(
                                    "publisher {publisher}: a publish to {channel} did not finish within {limit:?}"
                                ));
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut problems = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(problem)) => problems.push(problem),
                Err(error) => problems.push(format!("a publisher task failed: {error}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let shown = problems.len().min(3);
            Err(format!(
                "{} of the publishers failed; {}",
                problems.len(),
                problems[..shown].join("; ")
            ))
        }
    })
}

async fn publish_all(
    ctx: &Context<'_>,
    connection: &SharedRouter,
    batches: Vec<Vec<Envelope>>,
) -> Outcome<()> {
    publish_all_over(ctx, std::slice::from_ref(connection), batches).await
}

/// [`publish_all`] with the publishers spread over several connections.
async fn publish_all_over(
    ctx: &Context<'_>,
    connections: &[SharedRouter],
    batches: Vec<Vec<Envelope>>,
) -> Outcome<()> {
    ctx.phase(format!(
        "publishing {} messages from {} concurrent publishers",
        batches.iter().map(Vec::len).sum::<usize>(),
        batches.len()
    ));
    let task = spawn_publishers(connections, batches, ctx.wait);
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(problem)) => Err(Failure::Failed(problem)),
        Err(error) => Err(Failure::Failed(format!("the publishers failed: {error}"))),
    }
}

fn agent_options(ctx: &Context<'_>, session: &str, group: &str) -> AgentOptions {
    let options = AgentOptions::new().session(session);
    if ctx.capabilities.consumer_groups {
        options.group(ctx.unique(group))
    } else {
        options.fan_out()
    }
}

/// A [`Work`] envelope with this run's headers, encoded by the runtime's bus.
fn work_envelope(
    runtime: &Runtime,
    ctx: &Context<'_>,
    session: &str,
    seq: u64,
) -> Outcome<Envelope> {
    let channel = Work::channel(Work::DIRECTION, session).during("building the work channel")?;
    let work = Work {
        run: ctx.run.clone(),
        seq,
        label: format!("work {seq}"),
    };
    Ok(runtime
        .bus()
        .envelope(channel, &work)
        .during("encoding work")?
        .with_header(RUN_HEADER, ctx.run.clone())
        .with_header(STREAM_HEADER, "0")
        .with_header(SEQ_HEADER, seq.to_string()))
}

fn expected_streams(label: &'static str, streams: u32, per_stream: u64) -> Tally {
    let mut tally = Tally::new(label);
    for stream in 0..streams {
        tally.expect_stream(stream, per_stream);
    }
    tally
}

/// Sums the counts of several reports for a summary.
fn totals(reports: &[TallyReport]) -> String {
    let sum = |f: fn(&TallyReport) -> usize| reports.iter().map(f).sum::<usize>();
    format!(
        "lost {}, duplicated {}, reordered {}",
        sum(TallyReport::lost),
        sum(TallyReport::duplicated),
        sum(TallyReport::reordered)
    )
}

/// A summary for deliveries whose order means nothing (a group's members, dead letters).
fn unordered(report: &TallyReport) -> String {
    format!(
        "lost {} of {}, duplicated {}",
        report.lost(),
        report.expected(),
        report.duplicated()
    )
}

// ----- scenarios ---------------------------------------------------------------------------------

async fn declared_capabilities(ctx: &Context<'_>) -> Outcome {
    let connection = ctx.connect().await?;
    if connection.backend().trim().is_empty() {
        fail!("Router::backend() is empty: name the backend (`redis-streams`, `rabbitmq`, ...)");
    }
    let health = bounded(ctx.wait, "health()", connection.health()).await?;
    if !health.connected || health.status == HealthStatus::Unhealthy {
        fail!(
            "a new connection reports status {:?}, connected {}: {}",
            health.status,
            health.connected,
            health.detail
        );
    }
    if health.backend.trim().is_empty() {
        fail!("Health::backend is empty");
    }
    Ok(format!(
        "backend {:?} claims {}; a new connection is {:?}",
        connection.backend(),
        describe_capabilities(&ctx.capabilities),
        health.status
    ))
}

fn rich_envelope(ctx: &Context<'_>, channel: &Channel, reply_to: &str, seq: u64) -> Envelope {
    let (content_type, payload): (&'static str, Vec<u8>) = match seq % 3 {
        0 => (BINARY_CONTENT_TYPE, (0..=255u8).cycle().skip(seq as usize % 256).take(300).collect()),
        1 => (
            JSON_CONTENT_TYPE,
            format!(r#"{{"seq":{seq},"text":"h\u00e9llo \"x\" ✓","list":[1,2.5,null,true],"nested":{{"a":[]}}}}"#)
                .into_bytes(),
        ),
        _ => (
            MSGPACK_CONTENT_TYPE,
            Codec::MessagePack
                .encode("ConformanceFields", &(seq, "héllo", vec![0u8, 255, 7]))
                .map(|bytes| bytes.to_vec())
                .unwrap_or_default(),
        ),
    };
    Envelope::new(channel.clone(), content_type, payload)
        .with_correlation_id(format!("corr-{seq}-é"))
        .with_reply_to(reply_to.to_string())
        .with_attempt(1 + (seq % 3) as u32)
        .with_timestamp_ms(1_700_000_000_000 + seq)
        .with_header("tenant", "acme")
        .with_header("text", "é ✓ \"quoted\" \\ back\nnew line\ttab")
        .with_header("empty", "")
        .with_header("long", "x".repeat(1000))
        .with_header(RUN_HEADER, ctx.run.clone())
        .with_header(STREAM_HEADER, "0")
        .with_header(SEQ_HEADER, seq.to_string())
}

/// Names each field that differs between what was sent and what arrived.
fn difference(sent: &Envelope, got: &Envelope) -> String {
    let mut differences = Vec::new();
    let mut compare = |field: &str, a: String, b: String| {
        if a != b {
            differences.push(format!("{field} {a:?} arrived as {b:?}"));
        }
    };
    compare("id", sent.id().to_string(), got.id().to_string());
    compare("class", sent.class().into(), got.class().into());
    compare(
        "channel",
        sent.channel().name().into(),
        got.channel().name().into(),
    );
    compare(
        "canonical channel",
        sent.channel().canonical(),
        got.channel().canonical(),
    );
    compare(
        "content type",
        sent.content_type().into(),
        got.content_type().into(),
    );
    compare(
        "timestamp",
        sent.timestamp_ms().to_string(),
        got.timestamp_ms().to_string(),
    );
    compare(
        "correlation id",
        format!("{:?}", sent.correlation_id()),
        format!("{:?}", got.correlation_id()),
    );
    compare(
        "reply_to",
        format!("{:?}", sent.reply_to()),
        format!("{:?}", got.reply_to()),
    );
    compare(
        "attempt",
        sent.attempt().to_string(),
        got.attempt().to_string(),
    );
    for (name, value) in sent.headers() {
        match got.header(name) {
            None => differences.push(format!("header {name:?} is missing")),
            Some(other) if other != value => {
                differences.push(format!("header {name:?} {value:?} arrived as {other:?}"))
            }
            Some(_) => {}
        }
    }
    for name in got.headers().keys() {
        if sent.header(name).is_none() {
            differences.push(format!("header {name:?} was added"));
        }
    }
    if sent.payload() != got.payload() {
        let at = sent
            .payload()
            .iter()
            .zip(got.payload().iter())
            .position(|(a, b)| a != b)
            .unwrap_or(sent.payload().len().min(got.payload().len()));
        differences.push(format!(
            "payload of {} bytes arrived as {} bytes, first difference at byte {at}",
            sent.payload().len(),
            got.payload().len()
        ));
    }
    if differences.is_empty() {
        "equal".into()
    } else {
        differences.join(", ")
    }
}

async fn envelope_fields(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(100) as u64;
    let class = ctx.class("Fields");
    let session = ctx.unique("fields");
    let channel = ctx.channel(&class, "event", &session)?;
    let reply_to = format!("{class}:reply:{session}");
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(pattern(&format!("{class}:*:{session}"))?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    let mut sent = Vec::new();
    for seq in 0..count {
        let envelope = rich_envelope(ctx, &channel, &reply_to, seq);
        sent.push(envelope.clone());
        let outcome = publish_one(ctx, &publisher, envelope).await?;
        if outcome.is_unroutable() {
            fail!("message {seq} was reported unroutable although a subscription matches it");
        }
    }
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(count as usize, ctx.wait).await;
    sink.settle(ctx.settle).await;
    let report = sink.tally(&expected_streams("publisher", 1, count), None);
    let mut problems: Vec<String> = ctx
        .judge("the subscriber", &report, sink.foreign(), waited, true)
        .into_iter()
        .collect();
    let changed: Vec<String> = sink
        .arrivals()
        .iter()
        .filter(|arrival| arrival.envelope != sent[arrival.key.1 as usize])
        .map(|arrival| {
            format!(
                "message {}: {}",
                arrival.key.1,
                difference(&sent[arrival.key.1 as usize], &arrival.envelope)
            )
        })
        .collect();
    if !changed.is_empty() {
        problems.push(format!(
            "{} of {} messages arrived changed; first: {}",
            changed.len(),
            report.received(),
            changed[0]
        ));
    }
    failures(problems)?;
    Ok(format!(
        "{count} messages with every field set (binary, JSON and MessagePack payloads, unicode headers): \
         all equal; {report}"
    ))
}

async fn pattern_subscriptions(ctx: &Context<'_>) -> Outcome {
    let per_channel = ctx.size(3) as u64;
    let (a, b) = (ctx.class("PatA"), ctx.class("PatB"));
    let (dx, dy) = (ctx.unique("dx"), ctx.unique("dy"));
    let (sx, sy) = (ctx.unique("sx"), ctx.unique("sy"));
    let mut channels = Vec::new();
    for class in [&a, &b] {
        for direction in [&dx, &dy] {
            for session in [&sx, &sy] {
                channels.push(ctx.channel(class, direction, session)?);
            }
        }
    }
    let subscriptions: Vec<Vec<String>> = vec![
        vec![format!("{a}:*:*")],
        vec![format!("*:{dx}:*")],
        vec![format!("*:*:{sx}")],
        vec![format!("{a}:{dx}:*")],
        vec![format!("{a}:*:{sx}")],
        vec![format!("*:{dx}:{sx}")],
        vec![format!("{a}:{dx}:{sx}")],
        // Two patterns in one subscription; a message matching both comes once.
        vec![
            format!("{b}:*:{sy}"),
            format!("*:{dx}:{sx}"),
            format!("{a}:{dx}:{sx}"),
        ],
    ];
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut watched = Vec::new();
    for texts in &subscriptions {
        let patterns = texts
            .iter()
            .map(|t| pattern(t))
            .collect::<Outcome<Vec<_>>>()?;
        let mut expected = Tally::new("channel");
        for (index, channel) in channels.iter().enumerate() {
            if patterns.iter().any(|p| p.matches(channel)) {
                expected.expect_stream(index as u32, per_channel);
            }
        }
        let sink = ctx.sink(format!("subscription {}", texts.join(" + ")));
        let feeder = feed(
            ctx,
            &subscriber,
            SubscribeOptions::patterns(patterns),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        watched.push((texts.join(" + "), expected, sink, vec![feeder]));
    }
    // Groups whose members have a wildcard class: the classes are new (they get their first message
    // after the members subscribed), and a group's patterns are the union of its members'. Each
    // message the union matches reaches one member, once.
    if ctx.capabilities.consumer_groups {
        let groups: Vec<Vec<String>> = vec![
            vec![format!("*:{dx}:*")],
            vec![format!("*:*:{sx}"), format!("{b}:{dy}:*")],
        ];
        for (index, members) in groups.iter().enumerate() {
            let group = ctx.unique(&format!("patterns{index}"));
            let all = members
                .iter()
                .map(|t| pattern(t))
                .collect::<Outcome<Vec<_>>>()?;
            let mut expected = Tally::new("channel");
            for (index, channel) in channels.iter().enumerate() {
                if all.iter().any(|p| p.matches(channel)) {
                    expected.expect_stream(index as u32, per_channel);
                }
            }
            let name = format!("group {group} of members {}", members.join(" | "));
            let sink = ctx.sink(name.clone());
            let mut feeders = Vec::new();
            for (member, text) in members.iter().enumerate() {
                let options = SubscribeOptions::new(pattern(text)?).group(group.clone());
                feeders.push(feed(ctx, &subscriber, options, &sink, member, Settle::Ack).await?);
            }
            watched.push((name, expected, sink, feeders));
        }
    }
    let batches = channels
        .iter()
        .enumerate()
        .map(|(index, channel)| {
            (0..per_channel)
                .map(|seq| ctx.numbered(channel, index as u32, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    for (name, expected, sink, _) in &watched {
        sink.wait_distinct(expected.expected(), window.remaining())
            .await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(expected, None);
        let who = if name.starts_with("group ") {
            name.clone()
        } else {
            format!("subscription {name}")
        };
        // Order is per consumer: a group's members share a channel's messages.
        let ordered = !who.starts_with("group ");
        if let Some(problem) = ctx.judge(&who, &report, sink.foreign(), waited, ordered) {
            problems.push(problem);
        } else if report.duplicated() > 0 {
            // Nothing fails here (every delivery is acknowledged at once, no connection is lost), so
            // not even an at-least-once backend may deliver a message twice: a group hands each
            // message out once (see group_splits_work), and a subscription whose patterns overlap
            // gets what they both match once.
            let once = if ordered {
                "a subscription gets each message it matches once, also one that several of its patterns match"
            } else {
                "a group hands each message to one member once"
            };
            problems.push(format!("{who}: {report} within {waited:.1?}: {once}"));
        }
        reports.push(report);
    }
    if !problems.is_empty() {
        let legend: Vec<String> = channels
            .iter()
            .enumerate()
            .map(|(index, channel)| format!("channel {index} = {channel}"))
            .collect();
        fail!("{} ({})", problems.join("; "), legend.join(", "));
    }
    Ok(format!(
        "{} subscriptions ({} of them groups) over {} channels, {} deliveries: {}",
        watched.len(),
        watched.len() - subscriptions.len(),
        channels.len(),
        reports.iter().map(TallyReport::received).sum::<usize>(),
        totals(&reports)
    ))
}

async fn custom_templates(ctx: &Context<'_>) -> Outcome {
    let per_channel = ctx.size(3) as u64;
    let (first, second) = (ctx.unique("tpl1"), ctx.unique("tpl2"));
    let channels = [
        Templated::channel("alpha", &first).during("building a templated channel")?,
        Templated::channel("beta", &first).during("building a templated channel")?,
        Templated::channel("alpha", &second).during("building a templated channel")?,
    ];
    let expected_name = format!("conformance.alpha.{first}");
    if channels[0].name() != expected_name {
        fail!(
            "the template renders {:?}, expected {expected_name:?}",
            channels[0].name()
        );
    }
    let for_template = |direction: Option<&str>, session: &str| {
        ChannelPattern::for_message::<Templated>(direction, Some(session))
            .during("building a templated pattern")
    };
    let subscriptions = [
        (
            "ConformanceTemplated:*:tpl1",
            for_template(None, &first)?,
            vec![0, 1],
        ),
        (
            "ConformanceTemplated:alpha:tpl1",
            for_template(Some("alpha"), &first)?,
            vec![0],
        ),
        (
            "ConformanceTemplated:*:tpl2",
            for_template(None, &second)?,
            vec![2],
        ),
    ];
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut watched = Vec::new();
    for (name, pattern, streams) in subscriptions {
        let mut expected = Tally::new("channel");
        for stream in streams {
            expected.expect_stream(stream, per_channel);
        }
        let sink = ctx.sink(name);
        let feeder = feed(
            ctx,
            &subscriber,
            SubscribeOptions::new(pattern),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        watched.push((name, expected, sink, feeder));
    }
    let batches = channels
        .iter()
        .enumerate()
        .map(|(index, channel)| {
            (0..per_channel)
                .map(|seq| ctx.numbered(channel, index as u32, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    for (name, expected, sink, _) in &watched {
        sink.wait_distinct(expected.expected(), window.remaining())
            .await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(expected, None);
        if let Some(problem) = ctx.judge(
            &format!("subscription {name}"),
            &report,
            sink.foreign(),
            waited,
            true,
        ) {
            problems.push(problem);
        }
        for arrival in sink.arrivals() {
            let sent = &channels[arrival.key.0 as usize];
            if arrival.envelope.channel() != sent {
                problems.push(format!(
                    "a message sent on {:?} ({}) arrived on {:?} ({})",
                    sent.name(),
                    sent.canonical(),
                    arrival.envelope.channel().name(),
                    arrival.envelope.channel().canonical()
                ));
                break;
            }
        }
        reports.push(report);
    }
    if !problems.is_empty() {
        fail!(
            "{} (channel 0 = {}, 1 = {}, 2 = {}, template \"conformance.{{direction}}.{{session_id}}\")",
            problems.join("; "),
            channels[0].name(),
            channels[1].name(),
            channels[2].name()
        );
    }
    Ok(format!(
        "3 templated channels named like {:?}, 3 subscriptions: {}",
        channels[0].name(),
        totals(&reports)
    ))
}

async fn isolation(ctx: &Context<'_>) -> Outcome {
    let per_channel = ctx.size(3) as u64;
    let run = &ctx.run;
    let class = ctx.class("Iso");
    let direction = ctx.unique("d");
    let session = ctx.unique("iso");
    // Characters that are wildcards or escapes in Redis globs ('?', '[', ']', '\'), AMQP topics ('#',
    // '.') and MQTT ('+'), and Redis Cluster hash tags ('{', '}'): legal in a session, and a backend
    // must not let them match anything else.
    let special = format!("g?[x]#.+{{y}}\\_{run}");
    let mains = [
        ctx.channel(&class, &direction, &session)?,
        ctx.channel(&class, &direction, &special)?,
    ];
    let lookalikes = [
        ctx.channel(&class, &direction, &format!("{session}x"))?,
        ctx.channel(&class, &direction, &session[..session.len() - 1])?,
        ctx.channel(&class, &format!("{direction}x"), &session)?,
        ctx.channel(&class, &format!("{direction}.extra"), &session)?,
        ctx.channel(&format!("{class}x"), &direction, &session)?,
        ctx.channel(&class[..class.len() - 1], &direction, &session)?,
        ctx.channel(&class, &direction, &format!("gZx#.+{{y}}\\_{run}"))?,
        ctx.channel(&class, &direction, &format!("g?[x]a.b+{{y}}\\_{run}"))?,
        ctx.channel(&class, &direction, &format!("g?[x]#.Z{{y}}\\_{run}"))?,
        ctx.channel(&class, &direction, &format!("g?[x]#.+{{z}}\\_{run}"))?,
        ctx.channel(&class, &direction, &format!("g?[x]#.+{{y}}_{run}"))?,
    ];
    let all: Vec<&Channel> = mains.iter().chain(lookalikes.iter()).collect();
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut watched = Vec::new();
    for (index, channel) in mains.iter().enumerate() {
        let sink = ctx.sink(format!("the exact subscription on {channel}"));
        let feeder = feed(
            ctx,
            &subscriber,
            SubscribeOptions::new(exact(channel)?),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        let mut expected = Tally::new("channel");
        expected.expect_stream(index as u32, per_channel);
        watched.push((channel.clone(), expected, sink, feeder));
    }
    // The witness receives the look-alikes, so the test knows they were delivered before it judges.
    let witness = ctx.sink("the look-alike witness");
    let witness_patterns = lookalikes.iter().map(exact).collect::<Outcome<Vec<_>>>()?;
    let _witness_feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::patterns(witness_patterns),
        &witness,
        0,
        Settle::Ack,
    )
    .await?;
    let batches = all
        .iter()
        .enumerate()
        .map(|(index, channel)| {
            (0..per_channel)
                .map(|seq| ctx.numbered(channel, index as u32, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    ctx.phase("waiting for the published messages to arrive");
    let (witnessed, _) = witness
        .wait_distinct(lookalikes.len() * per_channel as usize, ctx.wait)
        .await;
    let mut problems = Vec::new();
    if !witnessed {
        problems.push(format!(
            "only {} of the {} look-alike messages reached their own exact subscriptions",
            witness.distinct(),
            lookalikes.len() * per_channel as usize
        ));
    }
    let mut reports = Vec::new();
    let window = ctx.window();
    for (channel, expected, sink, _) in &watched {
        sink.wait_distinct(expected.expected(), window.remaining())
            .await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(expected, None);
        if let Some(problem) = ctx.judge(
            &format!("the exact subscription on {channel}"),
            &report,
            sink.foreign(),
            waited,
            true,
        ) {
            problems.push(problem);
        }
        reports.push(report);
    }
    if !problems.is_empty() {
        let legend: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(index, channel)| format!("channel {index} = {channel}"))
            .collect();
        fail!("{} ({})", problems.join("; "), legend.join(", "));
    }
    Ok(format!(
        "2 exact subscriptions, {} look-alike channels: {}, leaked 0",
        lookalikes.len(),
        totals(&reports)
    ))
}

/// The connections the concurrent publishers share (several, as several services would).
const PUBLISHER_CONNECTIONS: usize = 5;

async fn concurrent_publishers(ctx: &Context<'_>) -> Outcome {
    let publishers = 50u32;
    let subscribers = 5;
    let per_publisher = (ctx.size(5000) / publishers as usize) as u64;
    let total = per_publisher as usize * publishers as usize;
    let channel = ctx.channel(&ctx.class("Concurrent"), &ctx.unique("d"), &ctx.unique("s"))?;
    let connections = [ctx.connect().await?, ctx.connect().await?];
    let mut publishing = Vec::new();
    for _ in 0..PUBLISHER_CONNECTIONS {
        publishing.push(ctx.connect().await?);
    }
    let mut sinks = Vec::new();
    for index in 0..subscribers {
        let sink = ctx.sink(format!("subscriber {index}"));
        let feeder = feed(
            ctx,
            &connections[index % 2],
            SubscribeOptions::new(exact(&channel)?),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        sinks.push((sink, feeder));
    }
    let batches = (0..publishers)
        .map(|p| {
            (0..per_publisher)
                .map(|seq| ctx.numbered(&channel, p, seq))
                .collect()
        })
        .collect();
    let started = Instant::now();
    publish_all_over(ctx, &publishing, batches).await?;
    let expected = expected_streams("publisher", publishers, per_publisher);
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    for (index, (sink, _)) in sinks.iter().enumerate() {
        sink.wait_distinct(total, window.remaining()).await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(&expected, None);
        if let Some(problem) = ctx.judge(
            &format!("subscriber {index}"),
            &report,
            sink.foreign(),
            waited,
            true,
        ) {
            problems.push(problem);
        }
        reports.push(report);
    }
    failures(problems)?;
    Ok(format!(
        "{total} messages from {publishers} concurrent publishers on {PUBLISHER_CONNECTIONS} connections to \
         {subscribers} subscribers on 2 connections in {:.2?}: {}",
        started.elapsed(),
        totals(&reports)
    ))
}

async fn many_channels(ctx: &Context<'_>) -> Outcome {
    let channel_count = ctx.size(64);
    let per_channel = 20u64;
    let class = ctx.class("Many");
    let direction = ctx.unique("d");
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut channels = Vec::new();
    let mut watched = Vec::new();
    for index in 0..channel_count {
        let channel = ctx.channel(&class, &direction, &format!("ch{index}_{}", ctx.run))?;
        let sink = ctx.sink(format!("channel {index}"));
        let feeder = feed(
            ctx,
            &subscriber,
            SubscribeOptions::new(exact(&channel)?),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        let mut expected = Tally::new("channel");
        expected.expect_stream(index as u32, per_channel);
        watched.push((expected, sink, feeder));
        channels.push(channel);
    }
    let batches = channels
        .iter()
        .enumerate()
        .map(|(index, channel)| {
            (0..per_channel)
                .map(|seq| ctx.numbered(channel, index as u32, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    let mut waits = Vec::new();
    for (expected, sink, _) in &watched {
        sink.wait_distinct(expected.expected(), window.remaining())
            .await;
        waits.push(window.elapsed());
    }
    // Judged once everything settled, so that late duplicates and leaks count too.
    for (_, sink, _) in &watched {
        sink.settle(ctx.settle).await;
    }
    for (index, ((expected, sink, _), waited)) in watched.iter().zip(waits).enumerate() {
        let report = sink.tally(expected, None);
        if let Some(problem) = ctx.judge(
            &format!("channel {index}"),
            &report,
            sink.foreign(),
            waited,
            true,
        ) {
            problems.push(problem);
        }
        reports.push(report);
    }
    if !problems.is_empty() {
        let shown = problems.len().min(5);
        fail!(
            "{} of {channel_count} channels went wrong; {}",
            problems.len(),
            problems[..shown].join("; ")
        );
    }
    Ok(format!(
        "{channel_count} channels × {per_channel} messages, each with its own subscription: {}",
        totals(&reports)
    ))
}

async fn order_per_channel(ctx: &Context<'_>) -> Outcome {
    let sessions = 16u32;
    let total = ctx.size(1000) as u64;
    let class = ctx.class("Order");
    let direction = ctx.unique("d");
    let channels = (0..sessions)
        .map(|index| ctx.channel(&class, &direction, &format!("o{index}_{}", ctx.run)))
        .collect::<Outcome<Vec<_>>>()?;
    let mut batches: Vec<Vec<Envelope>> = vec![Vec::new(); sessions as usize];
    let mut expected = Tally::new("session");
    for message in 0..total {
        let session = (message % sessions as u64) as u32;
        let seq = message / sessions as u64;
        batches[session as usize].push(ctx.numbered(&channels[session as usize], session, seq));
        expected.expect(session, seq);
    }
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let all_sessions = pattern(&format!("{class}:{direction}:*"))?;
    let mut watched = Vec::new();
    let sink = ctx.sink("the fan-out subscriber");
    let feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(all_sessions.clone()),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    watched.push(("the fan-out subscriber".to_string(), sink, feeder));
    if ctx.capabilities.consumer_groups {
        let sink = ctx.sink("the only member of a group");
        let options = SubscribeOptions::new(all_sessions).group(ctx.unique("order"));
        let feeder = feed(ctx, &subscriber, options, &sink, 0, Settle::Ack).await?;
        watched.push(("the only member of a group".to_string(), sink, feeder));
    }
    publish_all(ctx, &publisher, batches).await?;
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    for (who, sink, _) in &watched {
        sink.wait_distinct(total as usize, window.remaining()).await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(&expected, None);
        if let Some(problem) = ctx.judge(who, &report, sink.foreign(), waited, true) {
            problems.push(problem);
        }
        reports.push(report);
    }
    failures(problems)?;
    Ok(format!(
        "{total} messages over {sessions} sessions, {} consumer(s): {}",
        watched.len(),
        totals(&reports)
    ))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NackPlan {
    RetryNow,
    Requeue,
    Abandon,
    RetryLater,
    /// Acknowledged on its first delivery: it must never come back.
    Ack,
}

const RETRY_DELAY: Duration = Duration::from_millis(300);

impl NackPlan {
    fn of(seq: u64) -> Self {
        match seq % 5 {
            0 => NackPlan::RetryNow,
            1 => NackPlan::Requeue,
            2 => NackPlan::Abandon,
            3 => NackPlan::RetryLater,
            _ => NackPlan::Ack,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NackPlan::RetryNow => "nack(Retry { delay: 0 })",
            NackPlan::Requeue => "nack(Requeue)",
            NackPlan::Abandon => "dropped unsettled",
            NackPlan::RetryLater => "nack(Retry { delay: 300ms })",
            NackPlan::Ack => "ack()",
        }
    }

    async fn apply(self, delivery: Delivery) -> agentcomm_core::Result<()> {
        match self {
            NackPlan::RetryNow => {
                delivery
                    .nack(NackAction::Retry {
                        delay: Duration::ZERO,
                    })
                    .await
            }
            NackPlan::Requeue => delivery.nack(NackAction::Requeue).await,
            NackPlan::Abandon => {
                drop(delivery);
                Ok(())
            }
            NackPlan::RetryLater => {
                delivery
                    .nack(NackAction::Retry { delay: RETRY_DELAY })
                    .await
            }
            NackPlan::Ack => delivery.ack().await,
        }
    }
}

async fn nack_redelivery(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(15) as u64;
    let channel = ctx.channel(&ctx.class("Nack"), &ctx.unique("d"), &ctx.unique("s"))?;
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut options = SubscribeOptions::new(exact(&channel)?).prefetch(16);
    if ctx.capabilities.consumer_groups {
        options = options.group(ctx.unique("nack"));
    }
    let mut subscription = subscribe(ctx, &subscriber, options).await?;
    // Other subscriptions of the channel, which acknowledge everything: what the subscription above
    // gives back comes back to it alone (a retry published to the channel again reaches them too).
    let mut bystanders = Vec::new();
    let mut others = vec![(
        "a fan-out subscriber of the same channel".to_string(),
        SubscribeOptions::new(exact(&channel)?),
    )];
    if ctx.capabilities.consumer_groups {
        let group = ctx.unique("nack_other");
        others.push((
            format!("another group ({group}) of the same channel"),
            SubscribeOptions::new(exact(&channel)?).group(group),
        ));
    }
    for (who, options) in others {
        let sink = ctx.sink(who.clone());
        let feeder = feed(ctx, &subscriber, options, &sink, 0, Settle::Ack).await?;
        bystanders.push((who, sink, feeder));
    }
    for seq in 0..count {
        publish_one(ctx, &publisher, ctx.numbered(&channel, 0, seq)).await?;
    }
    ctx.phase("receiving, giving back and receiving again");
    // For each message: (attempt, when) of every delivery, and when it was given back.
    let mut deliveries: BTreeMap<u64, Vec<(u32, Instant, Envelope)>> = BTreeMap::new();
    let mut given_back: HashMap<u64, Instant> = HashMap::new();
    let mut problems = Vec::new();
    let mut foreign = 0;
    let deadline = Instant::now() + ctx.wait;
    let mut quiet_until: Option<Instant> = None;
    loop {
        // Every message arrived, and every one given back came back.
        let done = deliveries.len() as u64 == count
            && deliveries
                .iter()
                .all(|(seq, d)| NackPlan::of(*seq) == NackPlan::Ack || d.len() >= 2);
        if done && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + ctx.settle);
        }
        let until = quiet_until.unwrap_or(deadline).min(deadline);
        let next = match tokio::time::timeout_at(until, subscription.next()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => {
                problems.push("the subscription ended on its own".to_string());
                break;
            }
            Err(_) => break,
        };
        let envelope = next.envelope().clone();
        let Some((_, seq)) = key_of(&envelope, &ctx.run) else {
            foreign += 1;
            next.ack().await.during("acknowledging a foreign message")?;
            continue;
        };
        let entry = deliveries.entry(seq).or_default();
        entry.push((envelope.attempt(), Instant::now(), envelope.clone()));
        if entry.len() == 1 {
            given_back.insert(seq, Instant::now());
            bounded(ctx.wait, "nack", NackPlan::of(seq).apply(next))
                .await?
                .during(format!("{} of message {seq}", NackPlan::of(seq).describe()))?;
        } else {
            bounded(ctx.wait, "ack", next.ack())
                .await?
                .during(format!("acknowledging the redelivery of message {seq}"))?;
        }
    }
    let mut not_redelivered = Vec::new();
    let mut extra = 0;
    let mut acked_came_back = Vec::new();
    for seq in 0..count {
        let plan = NackPlan::of(seq);
        let Some(list) = deliveries.get(&seq) else {
            not_redelivered.push(format!("message {seq} never arrived"));
            continue;
        };
        if plan == NackPlan::Ack {
            // Nothing failed between its ack and now (no nack, no lost connection): a delivery that
            // comes back after a plain ack is an ack the backend did not carry out, whatever
            // no_duplicates says.
            if list.len() > 1 {
                acked_came_back.push(seq);
            }
            continue;
        }
        if list.len() < 2 {
            not_redelivered.push(format!(
                "message {seq} ({}) did not come back",
                plan.describe()
            ));
            continue;
        }
        extra += list.len() - 2;
        let (first_attempt, _, first) = &list[0];
        let (attempt, at, again) = &list[1];
        if again.id() != first.id()
            || again.payload() != first.payload()
            || again.channel() != first.channel()
        {
            problems.push(format!(
                "message {seq} ({}) came back changed: {}",
                plan.describe(),
                difference(first, again)
            ));
        }
        match plan {
            NackPlan::RetryNow | NackPlan::RetryLater if *attempt != first_attempt + 1 => {
                problems.push(format!(
                    "message {seq}: {} of attempt {first_attempt} came back as attempt {attempt}, expected {} \
                     (deliver the envelope given with the nack: the runtime counts attempts with it)",
                    plan.describe(),
                    first_attempt + 1
                ));
            }
            NackPlan::Requeue | NackPlan::Abandon if attempt < first_attempt => {
                problems.push(format!(
                    "message {seq}: {} of attempt {first_attempt} came back as attempt {attempt}",
                    plan.describe()
                ));
            }
            _ => {}
        }
        if plan == NackPlan::RetryLater {
            // Measured from before the nack to after the arrival, so a backend that waits the delay
            // never comes in under it; a tenth is left for a broker's coarser timers (a message TTL).
            let after = at.duration_since(given_back[&seq]);
            if after < RETRY_DELAY * 9 / 10 {
                problems.push(format!(
                    "message {seq} came back {after:?} after nack(Retry {{ delay: 300ms }}): the delay was not respected"
                ));
            }
        }
    }
    if !not_redelivered.is_empty() {
        problems.insert(
            0,
            format!(
                "lost {} of {count} redeliveries within {:?} (first: {})",
                not_redelivered.len(),
                ctx.wait,
                not_redelivered[0]
            ),
        );
    }
    if !acked_came_back.is_empty() {
        problems.push(format!(
            "messages {acked_came_back:?} were acknowledged on their first delivery and came back within {:?} \
             (the acknowledgement was not carried out)",
            ctx.settle
        ));
    }
    if extra > 0 && ctx.duplicates_fail() {
        problems.push(format!(
            "{extra} deliveries came back after they were acknowledged (the backend claims no_duplicates)"
        ));
    }
    if foreign > 0 {
        problems.push(format!(
            "{foreign} deliveries without this run's headers arrived"
        ));
    }
    let window = ctx.window();
    for (who, sink, _) in &bystanders {
        sink.wait_distinct(count as usize, window.remaining()).await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(&expected_streams("publisher", 1, count), None);
        if let Some(problem) = ctx.judge(who, &report, sink.foreign(), waited, true) {
            problems.push(problem);
        } else if report.duplicated() > 0 {
            // It acknowledged everything at once and no connection was lost: a copy came from the
            // other subscription's nacks, whatever no_duplicates says.
            problems.push(format!(
                "{who}: {report} within {waited:.1?}: what another subscription gave back came to this one too \
                 (a redelivery goes to the subscription that gave the message back, not to every subscription \
                 of the channel)"
            ));
        }
    }
    failures(problems)?;
    Ok(format!(
        "{count} messages nacked (retry, requeue, dropped, retry after 300ms) each came back once with the right \
         attempt, and the acknowledged ones did not; {extra} came back after the ack of their redelivery; {} \
         other subscription(s) of the channel got each message once",
        bystanders.len()
    ))
}

async fn dead_letter_after_max_attempts(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(5) as u64;
    let max_attempts = 3u32;
    let session = ctx.unique("dlq");
    let connection = ctx.connect().await?;
    let observer = ctx.connect().await?;
    let dead_letters = ctx.sink("dead letters");
    let dead_channel = Work::channel(Work::DIRECTION, &session)
        .during("building the work channel")?
        .dead_letter();
    let _feeder = feed(
        ctx,
        &observer,
        SubscribeOptions::new(exact(&dead_channel)?),
        &dead_letters,
        0,
        Settle::Ack,
    )
    .await?;
    let runtime = Runtime::builder_shared(connection.clone()).build();
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let agent = runtime
        .spawn_with(
            FailingAgent {
                calls: calls.clone(),
            },
            agent_options(ctx, &session, "dlq")
                .max_attempts(max_attempts)
                .backoff(
                    Backoff::new(Duration::from_millis(10), Duration::from_millis(40)).jitter(0.0),
                ),
        )
        .await
        .during("spawning the failing agent")?;
    let mut sent = HashMap::new();
    for seq in 0..count {
        let envelope = work_envelope(&runtime, ctx, &session, seq)?;
        sent.insert(seq, envelope.clone());
        publish_one(ctx, &connection, envelope).await?;
    }
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = dead_letters.wait_distinct(count as usize, ctx.wait).await;
    dead_letters.settle(ctx.settle).await;
    let report = dead_letters.tally(&expected_streams("work", 1, count), None);
    let mut problems: Vec<String> = ctx
        .judge(
            "dead letters",
            &report,
            dead_letters.foreign(),
            waited,
            false,
        )
        .into_iter()
        .collect();
    for arrival in dead_letters.arrivals() {
        let seq = arrival.key.1;
        let original = &sent[&seq];
        let dead = &arrival.envelope;
        let checks = [
            (
                "reason",
                dead.header(headers::DEAD_LETTER_REASON),
                Some(headers::REASON_HANDLER_FAILED.to_string()),
            ),
            (
                "attempts",
                dead.header(headers::ATTEMPTS),
                Some(max_attempts.to_string()),
            ),
            (
                "agent",
                dead.header(headers::AGENT),
                Some("ConformanceFailingAgent".to_string()),
            ),
            (
                "original id",
                dead.header(headers::ORIGINAL_ID),
                Some(original.id().to_string()),
            ),
            (
                "original channel",
                dead.header(headers::ORIGINAL_CHANNEL),
                Some(original.channel().name().to_string()),
            ),
        ];
        for (what, got, want) in checks {
            if got.map(str::to_string) != want {
                problems.push(format!(
                    "the dead letter of message {seq} has {what} {got:?}, expected {want:?}"
                ));
            }
        }
        if dead.class() != Work::CLASS || dead.payload() != original.payload() {
            problems.push(format!(
                "the dead letter of message {seq} does not carry the original message (class {:?}, {} payload bytes)",
                dead.class(),
                dead.payload().len()
            ));
        }
        if problems.len() > 5 {
            break;
        }
    }
    let calls = calls.lock().expect("calls lock").clone();
    for seq in 0..count {
        let made = calls.get(&seq).copied().unwrap_or(0);
        // An at-least-once backend may deliver an attempt twice; it must never skip one.
        if made < max_attempts || (ctx.duplicates_fail() && made != max_attempts) {
            let expected = if ctx.duplicates_fail() {
                "exactly"
            } else {
                "at least"
            };
            problems.push(format!(
                "message {seq} was handled {made} time(s), expected {expected} {max_attempts} (max_attempts)"
            ));
        }
    }
    agent.stop(Duration::from_secs(5)).await;
    failures(problems)?;
    Ok(format!(
        "{count} messages failed {max_attempts} attempts each and were dead-lettered with reason, attempts, agent \
         and original id: {}",
        unordered(&report)
    ))
}

async fn group_splits_work(ctx: &Context<'_>) -> Outcome {
    let total = ctx.size(300);
    let publishers = 10u32;
    let per_publisher = (total / publishers as usize) as u64;
    let total = per_publisher as usize * publishers as usize;
    let channel = ctx.channel(&ctx.class("Group"), &ctx.unique("d"), &ctx.unique("s"))?;
    let group = ctx.unique("workers");
    let connections = [ctx.connect().await?, ctx.connect().await?];
    let publisher = ctx.connect().await?;
    let members = 3;
    let group_sink = ctx.sink(format!("group {group}"));
    let mut feeders = Vec::new();
    for member in 0..members {
        let options = SubscribeOptions::new(exact(&channel)?)
            .group(group.clone())
            .prefetch(8);
        // A little work per message, so that no member takes everything before the others start.
        feeders.push(
            feed(
                ctx,
                &connections[member % 2],
                options,
                &group_sink,
                member,
                Settle::AckAfter(Duration::from_millis(1)),
            )
            .await?,
        );
    }
    let mut fan_outs = Vec::new();
    for connection in &connections {
        let sink = ctx.sink(format!("fan-out subscriber {}", fan_outs.len()));
        let feeder = feed(
            ctx,
            connection,
            SubscribeOptions::new(exact(&channel)?),
            &sink,
            0,
            Settle::Ack,
        )
        .await?;
        fan_outs.push((sink, feeder));
    }
    let batches = (0..publishers)
        .map(|p| {
            (0..per_publisher)
                .map(|seq| ctx.numbered(&channel, p, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    let expected = expected_streams("publisher", publishers, per_publisher);
    let mut problems = Vec::new();
    let window = ctx.window();
    group_sink.wait_distinct(total, window.remaining()).await;
    let waited = window.elapsed();
    let mut reports = Vec::new();
    for (index, (sink, _)) in fan_outs.iter().enumerate() {
        sink.wait_distinct(total, window.remaining()).await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(&expected, None);
        if let Some(problem) = ctx.judge(
            &format!("fan-out subscriber {index}"),
            &report,
            sink.foreign(),
            waited,
            true,
        ) {
            problems.push(problem);
        }
        reports.push(report);
    }
    group_sink.settle(ctx.settle).await;
    let group_report = group_sink.tally(&expected, None);
    if let Some(problem) = ctx.judge(
        &format!("group {group} (all members)"),
        &group_report,
        group_sink.foreign(),
        waited,
        false,
    ) {
        problems.push(problem);
    }
    let shares: Vec<usize> = (0..members)
        .map(|m| group_sink.keys(Some(m)).len())
        .collect();
    // An at-least-once group may deliver a message again, even to another member, after a failure
    // (a nack, a lost connection, a consumer idle past the broker's claim time). Nothing fails here:
    // every member acknowledges each message 1 ms after it arrives, on connections that stay up. So
    // a message that reaches two members, or one member twice, was handed out twice by the group,
    // whatever no_duplicates says.
    let mut members_of: HashMap<Key, BTreeSet<usize>> = HashMap::new();
    for arrival in group_sink.arrivals() {
        members_of
            .entry(arrival.key)
            .or_default()
            .insert(arrival.member);
    }
    let spread = members_of
        .values()
        .filter(|members| members.len() > 1)
        .count();
    if spread > 0 {
        problems.push(format!(
            "{spread} of {total} messages went to more than one member of group {group}: a group gives each \
             message to one of its members, not to each (that is fan-out)"
        ));
    } else if group_report.duplicated() > 0 {
        problems.push(format!(
            "group {group} handed {} message(s) twice to the same member although every delivery was \
             acknowledged and no connection was lost",
            group_report.duplicated()
        ));
    }
    if let Some(idle) = shares.iter().position(|share| *share == 0) {
        problems.push(format!(
            "member {idle} of group {group} got none of {total} messages (shares {shares:?}): the group does not \
             share the work between its members"
        ));
    }
    failures(problems)?;
    Ok(format!(
        "{total} messages: group of {members} shared them {shares:?} ({}); 2 fan-out subscribers each \
         got all ({})",
        unordered(&group_report),
        totals(&reports)
    ))
}

async fn two_groups(ctx: &Context<'_>) -> Outcome {
    let total = ctx.size(200) as u64;
    let channel = ctx.channel(&ctx.class("TwoGroups"), &ctx.unique("d"), &ctx.unique("s"))?;
    let connection = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut groups = Vec::new();
    for name in ["first", "second"] {
        let group = ctx.unique(name);
        let sink = ctx.sink(format!("group {group}"));
        let mut feeders = Vec::new();
        for member in 0..2 {
            let options = SubscribeOptions::new(exact(&channel)?)
                .group(group.clone())
                .prefetch(8);
            feeders.push(feed(ctx, &connection, options, &sink, member, Settle::Ack).await?);
        }
        groups.push((group, sink, feeders));
    }
    publish_all(
        ctx,
        &publisher,
        vec![
            (0..total)
                .map(|seq| ctx.numbered(&channel, 0, seq))
                .collect(),
        ],
    )
    .await?;
    let expected = expected_streams("publisher", 1, total);
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    let window = ctx.window();
    for (group, sink, _) in &groups {
        sink.wait_distinct(total as usize, window.remaining()).await;
        let waited = window.elapsed();
        sink.settle(ctx.settle).await;
        let report = sink.tally(&expected, None);
        if let Some(problem) = ctx.judge(
            &format!("group {group}"),
            &report,
            sink.foreign(),
            waited,
            false,
        ) {
            problems.push(problem);
        } else if report.duplicated() > 0 {
            // Every delivery is acknowledged at once and no connection is lost: nothing here lets an
            // at-least-once group hand a message out twice.
            problems.push(format!(
                "group {group}: {report} within {waited:.1?}: a group hands each message to one member once \
                 when nothing fails"
            ));
        }
        reports.push(report);
    }
    failures(problems)?;
    Ok(format!(
        "{total} messages, 2 groups of 2 members: each group got all ({})",
        reports.iter().map(unordered).collect::<Vec<_>>().join("; ")
    ))
}

/// Persistence is checked, and usable, only through a consumer group.
fn persistence_needs_groups(ctx: &Context<'_>) -> Outcome<()> {
    if !ctx.capabilities.consumer_groups {
        fail!(
            "the backend claims persistent but not consumer_groups: a consumer group is the only subscription the \
             Router contract lets outlive its consumer (a fan-out subscription gets only what is published after it \
             subscribed), so persistence can be neither used nor checked; claim consumer_groups too, or do not \
             claim persistent"
        );
    }
    Ok(())
}

async fn close_while_in_flight(ctx: &Context<'_>) -> Outcome {
    persistence_needs_groups(ctx)?;
    let publishers = 10u32;
    let per_publisher = (ctx.size(1000) / publishers as usize) as u64;
    let total = per_publisher as usize * publishers as usize;
    let channel = ctx.channel(&ctx.class("InFlight"), &ctx.unique("d"), &ctx.unique("s"))?;
    let group = ctx.unique("inflight");
    let first = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink(format!("group {group}"));
    let options = SubscribeOptions::new(exact(&channel)?)
        .group(group.clone())
        .prefetch(16);
    let first_feeder = feed(
        ctx,
        &first,
        options.clone(),
        &sink,
        0,
        Settle::AckAfter(Duration::from_millis(1)),
    )
    .await?;
    let batches = (0..publishers)
        .map(|p| {
            (0..per_publisher)
                .map(|seq| ctx.numbered(&channel, p, seq))
                .collect()
        })
        .collect();
    let publishing = spawn_publishers(std::slice::from_ref(&publisher), batches, ctx.wait);
    ctx.phase("waiting for the messages to be acknowledged");
    let (started, _) = sink.wait_acked(total / 4, ctx.wait).await;
    if !started {
        fail!(
            "the first member acknowledged only {} of {total} messages within {:?}",
            sink.distinct(),
            ctx.wait
        );
    }
    bounded(
        ctx.wait,
        "closing the first member's connection",
        first.close(),
    )
    .await?
    .during("closing the first member's connection")?;
    let acked_before = sink.keys(Some(0)).len();
    let second = ctx.connect().await?;
    let _second_feeder = feed(ctx, &second, options, &sink, 1, Settle::Ack).await?;
    match publishing.await {
        Ok(Ok(())) => {}
        Ok(Err(problem)) => fail!("{problem}"),
        Err(error) => fail!("the publishers failed: {error}"),
    }
    ctx.phase("waiting for the messages to be acknowledged");
    let (_, waited) = sink.wait_acked(total, ctx.wait).await;
    sink.settle(ctx.settle).await;
    drop(first_feeder);
    let mut expected = expected_streams("publisher", publishers, per_publisher);
    expected.record_all(
        sink.arrivals()
            .into_iter()
            .filter(|arrival| arrival.acked)
            .map(|arrival| arrival.key),
    );
    let report = expected.report();
    if let Some(problem) = ctx.judge(
        &format!("group {group}"),
        &report,
        sink.foreign(),
        waited,
        false,
    ) {
        fail!(
            "{problem} (acknowledged: {acked_before} by the member whose connection closed, the rest by the next; \
             {} acknowledgements failed)",
            sink.ack_failures.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    // A delivery whose ack resolved Ok is settled for good: close() waits for what is outstanding,
    // so neither the closing member nor the next one may get it again, even on an at-least-once
    // backend. (A feeder records a delivery after settling it, so a later record of the same key
    // is a later delivery.)
    let mut acked_by_first: BTreeSet<Key> = BTreeSet::new();
    let mut came_back: BTreeMap<Key, usize> = BTreeMap::new();
    for arrival in sink.arrivals() {
        if acked_by_first.contains(&arrival.key) {
            came_back.insert(arrival.key, arrival.member);
        }
        if arrival.acked && arrival.member == 0 {
            acked_by_first.insert(arrival.key);
        }
    }
    if let Some(((publisher, seq), member)) = came_back.iter().next() {
        fail!(
            "{} of the {} messages the member whose connection closed had acknowledged were delivered again \
             (first: publisher {publisher} seq {seq}, to the {}): an acknowledgement that resolved Ok was not \
             carried out",
            came_back.len(),
            acked_by_first.len(),
            if *member == 0 {
                "same member"
            } else {
                "next member"
            }
        );
    }
    Ok(format!(
        "{total} messages; the first member acknowledged {acked_before} before its connection closed mid-stream, \
         the next member got the rest: {}",
        unordered(&report)
    ))
}

async fn resubscribe_loops(ctx: &Context<'_>) -> Outcome {
    let rounds = ctx.size(20) as u64;
    let channel = ctx.channel(&ctx.class("Loop"), &ctx.unique("d"), &ctx.unique("s"))?;
    let shared = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut tally = Tally::new("round");
    let mut problems = Vec::new();
    let mut fresh_connections = 0;
    let mut foreign = 0;
    let mut ran = 0;
    for round in 0..rounds {
        ctx.phase(format!("round {round} of {rounds}"));
        ran += 1;
        tally.expect(0, round);
        let fresh = round % 5 == 4;
        let connection = if fresh {
            fresh_connections += 1;
            ctx.connect().await?
        } else {
            shared.clone()
        };
        let mut subscription =
            subscribe(ctx, &connection, SubscribeOptions::new(exact(&channel)?)).await?;
        publish_one(ctx, &publisher, ctx.numbered(&channel, 0, round)).await?;
        let deadline = Instant::now() + ctx.wait;
        loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(Some(delivery)) => {
                    let key = key_of(delivery.envelope(), &ctx.run);
                    bounded(ctx.wait, "ack", delivery.ack())
                        .await?
                        .during("acknowledging")?;
                    match key {
                        Some((stream, seq)) => {
                            tally.record(stream, seq);
                            if seq == round {
                                break;
                            }
                        }
                        None => foreign += 1,
                    }
                }
                Ok(None) => {
                    problems.push(format!(
                        "round {round}: the subscription ended before its message arrived"
                    ));
                    break;
                }
                Err(_) => break,
            }
        }
        bounded(ctx.wait, "closing the subscription", subscription.close())
            .await?
            .during(format!("round {round}: closing the subscription"))?;
        let deadline = Instant::now() + ctx.wait;
        loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(Some(delivery)) => {
                    match key_of(delivery.envelope(), &ctx.run) {
                        Some((stream, seq)) => tally.record(stream, seq),
                        None => foreign += 1,
                    }
                    // The subscription is closed: its acknowledgement may fail; the count is what matters.
                    let _ = bounded(ctx.wait, "ack", delivery.ack()).await?;
                }
                Ok(None) => break,
                Err(_) => {
                    problems.push(format!(
                        "round {round}: the subscription's stream did not end within {:?} after close()",
                        ctx.wait
                    ));
                    break;
                }
            }
        }
        if fresh {
            bounded(ctx.wait, "closing a connection", connection.close())
                .await?
                .during(format!("round {round}: closing the connection"))?;
        }
        if problems.len() >= 3 {
            break;
        }
    }
    let report = tally.report();
    if let Some(problem) = ctx.judge("the rounds", &report, foreign, ctx.wait, false) {
        problems.insert(
            0,
            format!("{problem} (a duplicate here is a message of an earlier round)"),
        );
    }
    if ran < rounds {
        let last = problems.len() - 1;
        let _ = write!(
            problems[last],
            " (the scenario stopped after {ran} of {rounds} rounds)"
        );
    }
    failures(problems)?;
    Ok(format!(
        "{rounds} rounds of subscribe, receive, close ({fresh_connections} on a fresh connection), every stream ended: \
         {report}"
    ))
}

async fn publisher_close(ctx: &Context<'_>) -> Outcome {
    let publishers = 20u32;
    let per_publisher = (ctx.size(10_000) / publishers as usize) as u64;
    let total = per_publisher as usize * publishers as usize;
    let channel = ctx.channel(
        &ctx.class("PublisherClose"),
        &ctx.unique("d"),
        &ctx.unique("s"),
    )?;
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(exact(&channel)?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    let batches = (0..publishers)
        .map(|p| {
            (0..per_publisher)
                .map(|seq| ctx.numbered(&channel, p, seq))
                .collect()
        })
        .collect();
    publish_all(ctx, &publisher, batches).await?;
    let closing = Instant::now();
    bounded(ctx.wait, "closing the publisher", publisher.close())
        .await?
        .during("closing the publisher right after its last publish")?;
    let closed_in = closing.elapsed();
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(total, ctx.wait).await;
    sink.settle(ctx.settle).await;
    let report = sink.tally(
        &expected_streams("publisher", publishers, per_publisher),
        None,
    );
    if let Some(problem) = ctx.judge("the subscriber", &report, sink.foreign(), waited, true) {
        fail!("{problem} after the publisher closed");
    }
    Ok(format!(
        "{total} messages from {publishers} publishers, publisher closed in {closed_in:.2?} right after: {report}"
    ))
}

async fn large_payloads(ctx: &Context<'_>) -> Outcome {
    const MEBIBYTE: usize = 1 << 20;
    let count = ctx.size(4) as u64;
    let channel = ctx.channel(&ctx.class("Large"), &ctx.unique("d"), &ctx.unique("s"))?;
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(exact(&channel)?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    for seq in 0..count {
        let envelope = Envelope::new(
            channel.clone(),
            BINARY_CONTENT_TYPE,
            pattern_bytes(seq, MEBIBYTE),
        )
        .with_header(RUN_HEADER, ctx.run.clone())
        .with_header(STREAM_HEADER, "0")
        .with_header(SEQ_HEADER, seq.to_string());
        publish_one(ctx, &publisher, envelope).await?;
    }
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(count as usize, ctx.wait).await;
    sink.settle(ctx.settle).await;
    let report = sink.tally(&expected_streams("publisher", 1, count), None);
    let mut problems: Vec<String> = ctx
        .judge("the subscriber", &report, sink.foreign(), waited, true)
        .into_iter()
        .collect();
    for arrival in sink.arrivals() {
        let want = pattern_bytes(arrival.key.1, MEBIBYTE);
        let got = arrival.envelope.payload();
        if got[..] != want[..] {
            let at = want
                .iter()
                .zip(got.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(got.len()));
            problems.push(format!(
                "message {}: a payload of {MEBIBYTE} bytes arrived as {} bytes, first difference at byte {at}",
                arrival.key.1,
                got.len()
            ));
            break;
        }
    }
    failures(problems)?;
    Ok(format!(
        "{count} payloads of 1 MiB arrived byte for byte: {report}"
    ))
}

async fn batch_publish(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(500) as u64;
    let channel = ctx.channel(&ctx.class("Batch"), &ctx.unique("d"), &ctx.unique("s"))?;
    let subscriber = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(exact(&channel)?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    let empty = bounded(
        ctx.wait,
        "publishing an empty batch",
        publisher.publish_batch(Vec::new()),
    )
    .await?;
    if !empty.is_empty() {
        fail!("an empty batch gave {} results, expected none", empty.len());
    }
    let envelopes: Vec<Envelope> = (0..count)
        .map(|seq| ctx.numbered(&channel, 0, seq))
        .collect();
    let results = bounded(
        ctx.wait,
        "publishing a batch",
        publisher.publish_batch(envelopes),
    )
    .await?;
    if results.len() as u64 != count {
        fail!(
            "a batch of {count} gave {} results: publish_batch must give one per envelope, in order",
            results.len()
        );
    }
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(index, result)| match result {
            Ok(outcome) if outcome.is_unroutable() => {
                Some(format!("message {index} was reported unroutable"))
            }
            Ok(_) => None,
            Err(error) => Some(format!("message {index}: {error}")),
        })
        .collect();
    if !failed.is_empty() {
        fail!(
            "{} of the batch's {count} publishes failed; first: {}",
            failed.len(),
            failed[0]
        );
    }
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(count as usize, ctx.wait).await;
    sink.settle(ctx.settle).await;
    let report = sink.tally(&expected_streams("publisher", 1, count), None);
    if let Some(problem) = ctx.judge("the subscriber", &report, sink.foreign(), waited, true) {
        fail!("{problem}");
    }
    Ok(format!(
        "a batch of {count} gave {count} results and delivered: {report}; an empty batch gave none"
    ))
}

async fn malformed_payloads(ctx: &Context<'_>) -> Outcome {
    let valid_after = ctx.size(10) as u64;
    let session = ctx.unique("malformed");
    let connection = ctx.connect().await?;
    let observer = ctx.connect().await?;
    let dead_letters = ctx.sink("dead letters");
    let channel = Work::channel(Work::DIRECTION, &session).during("building the work channel")?;
    let _feeder = feed(
        ctx,
        &observer,
        SubscribeOptions::new(exact(&channel.dead_letter())?),
        &dead_letters,
        0,
        Settle::Ack,
    )
    .await?;
    let runtime = Runtime::builder_shared(connection.clone()).build();
    let (handled_sender, mut handled) = watch::channel(Vec::<u64>::new());
    let agent = runtime
        .spawn_with(
            Worker {
                handled: handled_sender,
            },
            agent_options(ctx, &session, "malformed"),
        )
        .await
        .during("spawning the worker")?;
    let mark = |envelope: Envelope, stream: u32, seq: u64| {
        envelope
            .with_header(RUN_HEADER, ctx.run.clone())
            .with_header(STREAM_HEADER, stream.to_string())
            .with_header(SEQ_HEADER, seq.to_string())
    };
    publish_one(ctx, &connection, work_envelope(&runtime, ctx, &session, 0)?).await?;
    // Not MessagePack at all.
    let undecodable = Envelope::with_class(
        Work::CLASS,
        channel.clone(),
        MSGPACK_CONTENT_TYPE,
        vec![0xc1u8, 0xc1],
    );
    publish_one(ctx, &connection, mark(undecodable, 1, 1)).await?;
    // Decodes, but breaks the message's own rule (an empty label).
    let invalid_payload = Codec::MessagePack
        .encode(
            Work::CLASS,
            &Work {
                run: ctx.run.clone(),
                seq: 2,
                label: String::new(),
            },
        )
        .during("encoding an invalid message")?;
    let invalid = Envelope::with_class(
        Work::CLASS,
        channel.clone(),
        MSGPACK_CONTENT_TYPE,
        invalid_payload,
    );
    publish_one(ctx, &connection, mark(invalid, 1, 2)).await?;
    let valid: Vec<u64> = std::iter::once(0).chain(3..3 + valid_after).collect();
    for &seq in &valid[1..] {
        publish_one(
            ctx,
            &connection,
            work_envelope(&runtime, ctx, &session, seq)?,
        )
        .await?;
    }
    let all_handled = tokio::time::timeout(
        ctx.wait,
        handled.wait_for(|seen| valid.iter().all(|seq| seen.contains(seq))),
    )
    .await
    .is_ok();
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = dead_letters.wait_distinct(2, ctx.wait).await;
    dead_letters.settle(ctx.settle).await;
    let mut problems = Vec::new();
    let seen = handled.borrow().clone();
    if !all_handled {
        let missing: Vec<u64> = valid
            .iter()
            .copied()
            .filter(|seq| !seen.contains(seq))
            .collect();
        problems.push(format!(
            "the agent did not handle {} of the {} valid messages within {:?} (first missing: {:?}): a malformed \
             message stopped it",
            missing.len(),
            valid.len(),
            ctx.wait,
            missing.first()
        ));
    }
    if seen.iter().any(|seq| *seq == 1 || *seq == 2) {
        problems.push("a malformed message reached the handler".into());
    }
    let duplicates = seen.len().saturating_sub(valid.len());
    if duplicates > 0 && ctx.duplicates_fail() {
        problems.push(format!(
            "{duplicates} valid messages were handled twice (the backend claims no_duplicates)"
        ));
    }
    let mut expected = Tally::new("malformed");
    expected.expect(1, 1);
    expected.expect(1, 2);
    let report = dead_letters.tally(&expected, None);
    if let Some(problem) = ctx.judge(
        "dead letters",
        &report,
        dead_letters.foreign(),
        waited,
        false,
    ) {
        problems.push(problem);
    }
    for arrival in dead_letters.arrivals() {
        let want = if arrival.key.1 == 1 {
            headers::REASON_UNDECODABLE
        } else {
            headers::REASON_INVALID
        };
        let got = arrival.envelope.header(headers::DEAD_LETTER_REASON);
        if got != Some(want) {
            problems.push(format!(
                "the dead letter of message {} has reason {got:?}, expected {want:?}",
                arrival.key.1
            ));
        }
    }
    let health = agent.health();
    if health.state != AgentState::Running || health.rejected != 2 {
        problems.push(format!(
            "after the malformed messages the agent is {:?} with {} rejected, expected Running with 2",
            health.state, health.rejected
        ));
    }
    agent.stop(Duration::from_secs(5)).await;
    failures(problems)?;
    Ok(format!(
        "an undecodable and an invalid payload were dead-lettered (undecodable, invalid) and the agent handled all {} \
         valid messages around them",
        valid.len()
    ))
}

async fn malformed_frames(ctx: &Context<'_>) -> Outcome {
    let channel = ctx.channel(&ctx.class("Frames"), &ctx.unique("d"), &ctx.unique("s"))?;
    let subscriber = ctx.connect().await?;
    let observer = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(exact(&channel)?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    let malformed_channel = Channel::new(MALFORMED_CLASS, "frame", "unknown")
        .during("building the malformed channel")?
        .dead_letter();
    // The dead letters of every malformed frame go to one channel: this run's is told by its bytes.
    let mut dead_letters = subscribe(
        ctx,
        &observer,
        SubscribeOptions::new(exact(&malformed_channel)?),
    )
    .await?;
    publish_one(ctx, &publisher, ctx.numbered(&channel, 0, 0)).await?;
    let garbage = format!("not a frame {}", ctx.run).into_bytes();
    if !ctx.publish_raw(&channel, garbage.clone()).await? {
        return Err(Failure::NotApplicable(
            "the backend cannot inject raw frames (ConformanceBackend::publish_raw returns false)"
                .into(),
        ));
    }
    for seq in 1..3 {
        publish_one(ctx, &publisher, ctx.numbered(&channel, 0, seq)).await?;
    }
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(3, ctx.wait).await;
    let report = sink.tally(&expected_streams("publisher", 1, 3), None);
    let mut problems: Vec<String> = ctx
        .judge(
            "the subscriber, around a malformed frame",
            &report,
            sink.foreign(),
            waited,
            true,
        )
        .into_iter()
        .collect();
    let deadline = Instant::now() + ctx.wait;
    let mut found = None;
    while found.is_none() {
        match tokio::time::timeout_at(deadline, dead_letters.next()).await {
            Ok(Some(delivery)) => {
                if delivery.envelope().payload()[..] == garbage[..] {
                    found = Some(delivery.envelope().clone());
                }
                let _ = delivery.ack().await;
            }
            _ => break,
        }
    }
    match found {
        None => problems.push(format!(
            "no dead letter of the malformed frame reached {malformed_channel} within {:?}",
            ctx.wait
        )),
        Some(dead) => {
            if dead.header(headers::DEAD_LETTER_REASON) != Some(headers::REASON_MALFORMED_FRAME)
                || dead.header(headers::SOURCE).is_none_or(str::is_empty)
            {
                problems.push(format!(
                    "the malformed frame's dead letter has reason {:?} and source {:?}: build it with Envelope::malformed",
                    dead.header(headers::DEAD_LETTER_REASON),
                    dead.header(headers::SOURCE)
                ));
            }
        }
    }
    failures(problems)?;
    Ok(format!(
        "a malformed frame was dead-lettered and the subscriber got the 3 messages around it: {report}"
    ))
}

/// Each phase of the graceful-shutdown scenario publishes this many messages per session.
const SHUTDOWN_PER_SESSION: u64 = 3;

/// One instance of the gated agent, for the graceful-shutdown scenario.
struct GatedInstance {
    agent: agentcomm_core::runtime::AgentHandle,
    started: mpsc::UnboundedReceiver<u64>,
    /// The handlers seen starting so far.
    seen_started: Vec<u64>,
    gate: Arc<Semaphore>,
    finished: Arc<watch::Sender<Vec<u64>>>,
}

impl GatedInstance {
    async fn spawn(
        ctx: &Context<'_>,
        runtime: &Runtime,
        options: &AgentOptions,
        permits: usize,
    ) -> Outcome<Self> {
        let (started_sender, started) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(permits));
        let finished = Arc::new(watch::Sender::new(Vec::new()));
        ctx.phase("spawning an instance of the gated agent");
        let agent = bounded(
            ctx.wait,
            "spawning the gated agent",
            runtime.spawn_with(
                GatedAgent {
                    run: ctx.run.clone(),
                    started: started_sender,
                    gate: gate.clone(),
                    finished: finished.clone(),
                },
                options.clone(),
            ),
        )
        .await?
        .during("spawning the gated agent")?;
        Ok(GatedInstance {
            agent,
            started,
            seen_started: Vec::new(),
            gate,
            finished,
        })
    }

    /// Waits until a handler has started.
    async fn wait_started(&mut self, ctx: &Context<'_>) -> Outcome<()> {
        ctx.phase("waiting for a handler to start");
        match tokio::time::timeout(ctx.wait, self.started.recv()).await {
            Ok(Some(seq)) => {
                self.seen_started.push(seq);
                Ok(())
            }
            _ => fail!("no handler started within {:?}", ctx.wait),
        }
    }

    /// Every handler that has started so far. (How many run at once depends on how the runtime
    /// spreads the two sessions over its two workers: both may share one.)
    fn all_started(&mut self) -> Vec<u64> {
        while let Ok(seq) = self.started.try_recv() {
            self.seen_started.push(seq);
        }
        self.seen_started.clone()
    }

    fn finished(&self) -> Vec<u64> {
        self.finished.borrow().clone()
    }

    /// Waits until every one of `seqs` has finished, woken by each handler that finishes; false when
    /// `deadline` came first.
    async fn wait_finished(&self, seqs: &BTreeSet<u64>, deadline: Instant) -> bool {
        let mut finished = self.finished.subscribe();
        tokio::time::timeout_at(
            deadline,
            finished.wait_for(|finished| seqs.iter().all(|seq| finished.contains(seq))),
        )
        .await
        .is_ok_and(|waited| waited.is_ok())
    }
}

/// Publishes [`SHUTDOWN_PER_SESSION`] messages to each session, alternating, numbered from `first`.
async fn publish_work(
    ctx: &Context<'_>,
    runtime: &Runtime,
    connection: &SharedRouter,
    sessions: &[String],
    first: u64,
) -> Outcome<Vec<u64>> {
    let mut seqs = Vec::new();
    for round in 0..SHUTDOWN_PER_SESSION {
        for (index, session) in sessions.iter().enumerate() {
            let seq = first + round * sessions.len() as u64 + index as u64;
            publish_one(ctx, connection, work_envelope(runtime, ctx, session, seq)?).await?;
            seqs.push(seq);
        }
    }
    Ok(seqs)
}

async fn graceful_shutdown(ctx: &Context<'_>) -> Outcome {
    let sessions = [ctx.unique("shutdown_a"), ctx.unique("shutdown_b")];
    let connection = ctx.connect().await?;
    let runtime = Runtime::builder_shared(connection.clone()).build();
    // Two sessions, two workers: a handler runs for each while the others wait in the buffers.
    let options = AgentOptions::new().concurrency(2).prefetch(16);
    let options = if ctx.capabilities.consumer_groups {
        options.group(ctx.unique("shutdown"))
    } else {
        options.fan_out()
    };
    let mut problems = Vec::new();

    // 1. Stop while handlers run and more messages are buffered: stop waits for all of them.
    let mut first = GatedInstance::spawn(ctx, &runtime, &options, 0).await?;
    let first_batch = publish_work(ctx, &runtime, &connection, &sessions, 0).await?;
    first.wait_started(ctx).await?;
    let stopping = tokio::spawn({
        let agent = first.agent.clone();
        async move { agent.stop(Duration::from_secs(20)).await }
    });
    ctx.phase("checking that stop waits for the running handlers");
    // Give the stop time to return early if it is going to (this sleep creates the condition).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The gate is closed: every handler that started is still running.
    let running = first.all_started();
    if stopping.is_finished() {
        fail!(
            "AgentHandle::stop returned while handlers of messages {running:?} were still running: it must wait \
             for in-flight handlers"
        );
    }
    first.gate.add_permits(first_batch.len());
    ctx.phase("waiting for the first instance to stop once its handlers were released");
    let drained = match tokio::time::timeout(ctx.wait, stopping).await {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => fail!("stopping the agent failed: {error}"),
        Err(_) => fail!(
            "the agent did not stop within {:?} after its handlers were released",
            ctx.wait
        ),
    };
    let handled_first = first.finished();
    if let Some(cut) = running.iter().find(|seq| !handled_first.contains(seq)) {
        problems.push(format!(
            "the handler of message {cut} was running when stop was called, but did not finish before stop \
             returned (finished: {handled_first:?})"
        ));
    }
    if drained.aborted != 0 || drained.handled != handled_first.len() as u64 {
        problems.push(format!(
            "with a 20 s deadline the stop report says {drained:?}, expected {} handled (every handler that \
             finished) and none aborted",
            handled_first.len()
        ));
    }

    // 2. Stop with handlers stuck past a short deadline: they are cut off, and what the instance
    //    held goes back to the backend.
    let mut second = GatedInstance::spawn(ctx, &runtime, &options, 0).await?;
    let second_batch = publish_work(
        ctx,
        &runtime,
        &connection,
        &sessions,
        first_batch.len() as u64,
    )
    .await?;
    second.wait_started(ctx).await?;
    ctx.phase("stopping the second instance with its handlers stuck past a 300 ms deadline");
    let cut_off = bounded(
        ctx.wait,
        "stopping the second instance",
        second.agent.stop(Duration::from_millis(300)),
    )
    .await?;
    // Nothing starts once stop has returned: these are all the handlers the deadline cut off.
    let stuck = second.all_started();
    if cut_off.aborted != stuck.len() as u64 || !second.finished().is_empty() {
        problems.push(format!(
            "with the handlers of messages {stuck:?} stuck past the deadline the stop report says {cut_off:?} \
             (finished {:?}), expected {} aborted",
            second.finished(),
            stuck.len()
        ));
    }

    // 3. The next instance gets exactly what was not handled: what was cut off, given back or never
    //    taken, and nothing that was handled and acknowledged.
    let mut summary = format!(
        "stop waited for {} running handler(s) and {} buffered message(s) ({drained:?}); a 300 ms deadline cut \
         off {} stuck handler(s) ({cut_off:?})",
        running.len(),
        handled_first.len().saturating_sub(running.len()),
        stuck.len()
    );
    if ctx.capabilities.redelivery && ctx.capabilities.consumer_groups {
        let expected: BTreeSet<u64> = first_batch
            .iter()
            .filter(|seq| !handled_first.contains(seq))
            .chain(&second_batch)
            .copied()
            .collect();
        let third = GatedInstance::spawn(ctx, &runtime, &options, expected.len() + 100).await?;
        ctx.phase(format!(
            "waiting for the {} messages the stopped instances did not handle to reach the next one",
            expected.len()
        ));
        // Missing ones are reported below, with the whole picture.
        third
            .wait_finished(&expected, Instant::now() + ctx.wait)
            .await;
        ctx.phase("listening for messages delivered again");
        tokio::time::sleep(ctx.settle).await;
        let handled_third = third.finished();
        let lost: Vec<u64> = expected
            .iter()
            .filter(|seq| !handled_third.contains(seq))
            .copied()
            .collect();
        if !lost.is_empty() {
            problems.push(format!(
                "{} of the {} messages the stopped instances did not handle never reached the next instance \
                 within {:?} (first: {}): what a stopping agent gives back must be delivered again",
                lost.len(),
                expected.len(),
                ctx.wait,
                lost[0]
            ));
        }
        let again: Vec<u64> = handled_third
            .iter()
            .filter(|seq| handled_first.contains(seq))
            .copied()
            .collect();
        if !again.is_empty() {
            problems.push(format!(
                "messages {again:?} were delivered again after the stopped agent handled them: they were not \
                 acknowledged"
            ));
        }
        third.agent.stop(Duration::from_secs(5)).await;
        let _ = write!(
            summary,
            "; the next instance got the {} messages not handled and none of the {} handled",
            expected.len(),
            handled_first.len()
        );
    }
    failures(problems)?;
    Ok(summary)
}

async fn request_reply(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(20) as u64;
    let session = ctx.unique("echo");
    let connection = ctx.connect().await?;
    let runtime = Runtime::builder_shared(connection.clone()).build();
    let agent = runtime
        .spawn_with(EchoAgent, agent_options(ctx, &session, "echo"))
        .await
        .during("spawning the echo agent")?;
    let bus = runtime.bus();
    let replies = futures::future::join_all((0..count).map(|seq| {
        let request = EchoRequest {
            run: ctx.run.clone(),
            seq,
        };
        let session = session.clone();
        async move {
            bus.request::<EchoRequest, EchoResponse>(&session, &request, ctx.wait)
                .await
        }
    }))
    .await;
    let mut problems = Vec::new();
    check_replies(
        ctx,
        replies,
        |r| (r.seq, &r.run),
        "request",
        "",
        &mut problems,
    );
    agent.stop(Duration::from_secs(5)).await;
    // A reply type with a channel template of its own: the inbox is named with it.
    let templated = runtime
        .spawn_with(
            TemplatedEchoAgent,
            agent_options(ctx, &session, "templated_echo"),
        )
        .await
        .during("spawning the templated echo agent")?;
    let templated_count = count.min(5);
    let templated_replies = futures::future::join_all((0..templated_count).map(|seq| {
        let request = TemplatedEchoRequest {
            run: ctx.run.clone(),
            seq,
        };
        let session = session.clone();
        async move {
            bus.request::<TemplatedEchoRequest, TemplatedEchoResponse>(&session, &request, ctx.wait)
                .await
        }
    }))
    .await;
    check_replies(
        ctx,
        templated_replies,
        |r| (r.seq, &r.run),
        "templated request",
        "",
        &mut problems,
    );
    templated.stop(Duration::from_secs(5)).await;
    if !problems.is_empty() {
        fail!(
            "{} of {} requests went wrong; first: {}",
            problems.len(),
            count + templated_count,
            problems[0]
        );
    }
    Ok(format!(
        "{count} concurrent requests each got their own reply, and {templated_count} whose reply type has a channel template"
    ))
}

/// Notes in `problems` each of `replies` (to requests numbered from 0, in order) that failed or answers
/// another request (`answers`: the `seq` and `run` a reply echoes). `what` names a request in the notes
/// ("request 3"), `failed_when` follows it in a failure's note.
fn check_replies<R>(
    ctx: &Context<'_>,
    replies: Vec<Result<R, Error>>,
    answers: impl Fn(&R) -> (u64, &str),
    what: &str,
    failed_when: &str,
    problems: &mut Vec<String>,
) {
    for (seq, reply) in replies.into_iter().enumerate() {
        match reply {
            Ok(reply) => {
                let (answered, run) = answers(&reply);
                if answered != seq as u64 || run != ctx.run {
                    problems.push(format!(
                        "{what} {seq} got the reply to request {answered} of run {run}"
                    ));
                }
            }
            Err(error) => problems.push(format!("{what} {seq}{failed_when}: {error}")),
        }
    }
}

/// The `seq` of the request [`request_failures`]'s agent fails.
const FAILING_REQUEST: u64 = 1_000_000;

async fn request_failures(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(8) as u64;
    let connection = ctx.connect().await?;
    let runtime = Runtime::builder_shared(connection.clone()).build();
    let bus = runtime.bus();
    let mut problems = Vec::new();
    let request = |seq: u64| EchoRequest {
        run: ctx.run.clone(),
        seq,
    };
    // Each request on a session of its own, so that the agent handles them all at once (one session's
    // are handled in order).
    let session = |seq: u64| ctx.unique(&format!("asked{seq}"));

    // Nobody receives the class yet: a backend that can tell says so at once; one that cannot lets the
    // request wait its timeout, and the timeout names the request's class.
    ctx.phase("a request nobody receives");
    let short = Duration::from_millis(500).max(ctx.settle);
    let began = Instant::now();
    let unanswered = bounded(
        ctx.wait,
        "a request nobody receives",
        bus.request::<EchoRequest, EchoResponse>(&session(0), &request(0), short),
    )
    .await?;
    let unrouted = ctx.capabilities.reports_unroutable;
    let no_agent = match unanswered {
        // A backend that does not claim it may still tell, when it can be sure.
        Err(Error::NoAgentFound { class, .. }) if class == EchoRequest::CLASS => {
            format!("NoAgentFound after {:.2?}", began.elapsed())
        }
        Err(Error::Timeout { operation, .. })
            if !unrouted && operation.contains(EchoRequest::CLASS) =>
        {
            "timed out naming its class".to_string()
        }
        other => {
            problems.push(format!(
            "a request nobody receives ended with {other:?} after {:.2?}; expected {}",
            began.elapsed(),
            if unrouted {
                "NoAgentFound naming its class at once (the backend reports unroutable messages)"
            } else {
                "a Timeout naming its class"
            }
        ));
            String::new()
        }
    };

    let started = Arc::new(watch::Sender::new(Vec::new()));
    let (release, released) = watch::channel(Vec::new());
    let options = |ctx: &Context<'_>| {
        let options = AgentOptions::new()
            .concurrency(count as usize)
            .prefetch(count as usize)
            .max_attempts(1);
        if ctx.capabilities.consumer_groups {
            options.group(ctx.unique("asked"))
        } else {
            options.fan_out()
        }
    };
    let agent = |ctx: &Context<'_>| GatedEchoAgent {
        run: ctx.run.clone(),
        fail: vec![FAILING_REQUEST],
        started: started.clone(),
        released: released.clone(),
    };
    let first = runtime
        .spawn_with(agent(ctx), options(ctx))
        .await
        .during("spawning the answering agent")?;

    // A request its agent dead-letters: its requester is told at once, not at its timeout.
    ctx.phase("a request its agent dead-letters");
    let began = Instant::now();
    let failed = bounded(
        ctx.wait,
        "a request its agent dead-letters",
        bus.request::<EchoRequest, EchoResponse>(
            &session(FAILING_REQUEST),
            &request(FAILING_REQUEST),
            ctx.wait * 4,
        ),
    )
    .await;
    match failed {
        Ok(Err(Error::RequestFailed(failure)))
            if failure.class == EchoRequest::CLASS
                && failure.agent == GatedEchoAgent::NAME
                && failure.error.contains("fails on purpose") => {}
        Ok(other) => problems.push(format!(
            "a request its agent dead-letters ended with {other:?} after {:.2?}; expected RequestFailed \
             from {} with the handler's error",
            began.elapsed(),
            GatedEchoAgent::NAME
        )),
        Err(_) => problems.push(format!(
            "a request its agent dead-letters was not told within {:.2?}: its requester waits for its \
             timeout",
            ctx.wait
        )),
    }

    // Requests cancelled while their agent handles them leave nothing waiting, and their replies,
    // coming late, are counted as unmatched.
    ctx.phase("requests cancelled while their agent handles them");
    let unmatched_before = bus.unmatched_replies();
    let cancelled = futures::future::join_all((0..count).map(|seq| {
        let session = session(seq);
        let request = request(seq);
        let mut handled = started.subscribe();
        let release = &release;
        async move {
            let asking = bus.request::<EchoRequest, EchoResponse>(&session, &request, ctx.wait * 4);
            let outcome = tokio::select! {
                reply = asking => Some(reply),
                _ = handled.wait_for(|started| started.contains(&seq)) => None,
            };
            // The request is dropped (cancelled) by now: its agent may answer.
            release.send_modify(|released| released.push(seq));
            outcome
        }
    }));
    let ended: Vec<String> = bounded(
        ctx.wait,
        "cancelling requests while their agent handles them",
        cancelled,
    )
    .await?
    .into_iter()
    .enumerate()
    .filter_map(|(seq, outcome)| Some(format!("request {seq}: {:?}", outcome?)))
    .collect();
    if !ended.is_empty() {
        fail!("requests held by their agent ended before it answered them: {ended:?}");
    }
    if bus.pending_requests() != 0 {
        problems.push(format!(
            "{} of {count} cancelled requests are still registered as waiting",
            bus.pending_requests()
        ));
    }
    let late_limit = Instant::now() + ctx.wait;
    while bus.unmatched_replies() < unmatched_before + count && Instant::now() < late_limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let late = bus.unmatched_replies() - unmatched_before;
    if late != count {
        problems.push(format!(
            "{late} of the {count} replies to cancelled requests were counted as unmatched within {:.2?}",
            ctx.wait
        ));
    }

    // Several members of the answering agent's group: each request is answered once, by one of them.
    let mut second = None;
    if ctx.capabilities.consumer_groups {
        ctx.phase("requests to a group of two members");
        second = Some(
            runtime
                .spawn_with(agent(ctx), options(ctx))
                .await
                .during("spawning the group's second member")?,
        );
    }
    ctx.phase("requests after the cancelled ones");
    release.send_modify(|released| released.extend(count..count * 2));
    let unmatched_before = bus.unmatched_replies();
    let replies = futures::future::join_all((0..count * 2).map(|seq| {
        let session = session(seq);
        let request = request(seq);
        async move {
            bus.request::<EchoRequest, EchoResponse>(&session, &request, ctx.wait)
                .await
        }
    }))
    .await;
    check_replies(
        ctx,
        replies,
        |r| (r.seq, &r.run),
        "request",
        " after the cancelled ones",
        &mut problems,
    );
    ctx.phase("listening for duplicate replies");
    tokio::time::sleep(ctx.settle).await;
    let extra = bus.unmatched_replies() - unmatched_before;
    if extra != 0 {
        problems.push(format!(
            "{extra} replies beyond one per request arrived (a request answered by several members)"
        ));
    }
    first.stop(Duration::from_secs(5)).await;
    if let Some(second) = second {
        second.stop(Duration::from_secs(5)).await;
    }
    failures(problems)?;
    Ok(format!(
        "no agent: {no_agent}; dead-lettered: told at once; {count} cancelled: none left waiting, their late replies counted; {} requests to {} answered once each",
        count * 2,
        if ctx.capabilities.consumer_groups {
            "a group of two"
        } else {
            "one agent"
        }
    ))
}

async fn requests_across_a_cut(ctx: &Context<'_>) -> Outcome {
    let Some(address) = ctx.broker_address() else {
        return Ok("not checked: the backend offers no fault proxy target \
                   (ConformanceBackend::broker_address or connect_through gave None)"
            .to_string());
    };
    let proxy = bounded(
        ctx.wait,
        "starting the fault proxy",
        crate::proxy::FaultProxy::start(address),
    )
    .await?
    .during(format!("starting the fault proxy to {address}"))?;
    let Some(through) = ctx.connect_through(proxy.local_addr()).await? else {
        return Ok("not checked: connect_through gave None".to_string());
    };
    let session = ctx.unique("cut");
    let answering = Runtime::builder_shared(ctx.connect().await?).build();
    let agent = answering
        .spawn_with(EchoAgent, agent_options(ctx, &session, "cut"))
        .await
        .during("spawning the echo agent")?;
    let asking = Runtime::builder_shared(through).build();
    let bus = asking.bus();
    let request = |seq: u64| EchoRequest {
        run: ctx.run.clone(),
        seq,
    };
    ctx.phase("a request before the cut");
    let first = bounded(
        ctx.wait,
        "a request before the cut",
        bus.request::<EchoRequest, EchoResponse>(&session, &request(0), ctx.wait),
    )
    .await?;
    if let Err(error) = first {
        fail!("a request before the cut failed: {error}");
    }
    proxy.cut_all();
    // Each request waits a few seconds at most; the requester's connection comes back, and with it its
    // reply inbox: some request within the scenario's wait gets its reply.
    ctx.phase("requests after the requester's connection was cut");
    let per_request = (ctx.wait / 10).max(Duration::from_secs(2));
    let deadline = Instant::now() + ctx.wait;
    let mut failed = Vec::new();
    let mut seq = 1;
    let answered = loop {
        let reply = bus
            .request::<EchoRequest, EchoResponse>(&session, &request(seq), per_request)
            .await;
        match reply {
            Ok(reply) if reply.seq == seq && reply.run == ctx.run => break true,
            Ok(reply) => failed.push(format!("request {seq} got the reply to {}", reply.seq)),
            Err(error) => failed.push(format!("request {seq}: {error}")),
        }
        seq += 1;
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    agent.stop(Duration::from_secs(5)).await;
    drop(proxy);
    if !answered {
        fail!(
            "after the requester's connection was cut, no request got its reply within {:.2?}: {} failed, last: {}",
            ctx.wait,
            failed.len(),
            failed.last().map(String::as_str).unwrap_or("-")
        );
    }
    Ok(format!(
        "after a cut of the requester's connection, request {seq} got its reply ({} before it failed{})",
        failed.len(),
        failed
            .first()
            .map(|first| format!(", first: {first}"))
            .unwrap_or_default()
    ))
}

async fn persistent_without_consumer(ctx: &Context<'_>) -> Outcome {
    persistence_needs_groups(ctx)?;
    let count = ctx.size(100) as u64;
    let channel = ctx.channel(&ctx.class("Offline"), &ctx.unique("d"), &ctx.unique("s"))?;
    let group = ctx.unique("offline");
    let options = SubscribeOptions::new(exact(&channel)?)
        .group(group.clone())
        .prefetch(16);
    // The group exists once a member has subscribed; then nobody is connected.
    let first = ctx.connect().await?;
    let subscription = subscribe(ctx, &first, options.clone()).await?;
    drop(subscription);
    bounded(
        ctx.wait,
        "closing the only member's connection",
        first.close(),
    )
    .await?
    .during("closing the only member's connection")?;
    let publisher = ctx.connect().await?;
    for seq in 0..count {
        let outcome = publish_one(ctx, &publisher, ctx.numbered(&channel, 0, seq)).await?;
        if outcome.is_unroutable() {
            fail!(
                "message {seq}, published while the group had no member connected, was reported unroutable: it is lost"
            );
        }
    }
    let second = ctx.connect().await?;
    let sink = ctx.sink("the member that connected later");
    let _feeder = feed(ctx, &second, options, &sink, 0, Settle::Ack).await?;
    ctx.phase("waiting for the published messages to arrive");
    let (_, waited) = sink.wait_distinct(count as usize, ctx.wait).await;
    sink.settle(ctx.settle).await;
    let report = sink.tally(&expected_streams("publisher", 1, count), None);
    if let Some(problem) = ctx.judge(
        &format!("the member of group {group} that connected later"),
        &report,
        sink.foreign(),
        waited,
        true,
    ) {
        fail!("{problem}");
    }
    Ok(format!(
        "{count} messages published with no consumer connected reached the group's next member: {report}"
    ))
}

async fn unroutable(ctx: &Context<'_>) -> Outcome {
    let channel = ctx.channel(&ctx.class("Unroutable"), &ctx.unique("d"), &ctx.unique("s"))?;
    let publisher = ctx.connect().await?;
    let subscriber = ctx.connect().await?;
    let outcome = publish_one(ctx, &publisher, ctx.numbered(&channel, 0, 0)).await?;
    if !outcome.is_unroutable() {
        fail!(
            "a publish to {channel}, which no subscription matches, was reported {outcome:?}, expected Unroutable"
        );
    }
    let mut subscription =
        subscribe(ctx, &subscriber, SubscribeOptions::new(exact(&channel)?)).await?;
    let outcome = publish_one(ctx, &publisher, ctx.numbered(&channel, 0, 1)).await?;
    if outcome.is_unroutable() {
        fail!("a publish to {channel}, which a live subscription matches, was reported Unroutable");
    }
    match bounded(
        ctx.wait,
        "receiving the routable message",
        subscription.next(),
    )
    .await?
    {
        Some(delivery) if key_of(delivery.envelope(), &ctx.run) == Some((0, 1)) => {
            delivery.ack().await.during("acknowledging")?;
        }
        Some(delivery) => fail!(
            "the subscription got {:?} instead of the routable message (seq 1); the unroutable one must not be kept",
            key_of(delivery.envelope(), &ctx.run)
        ),
        None => fail!("the subscription ended before the routable message arrived"),
    }
    Ok(format!(
        "no subscriber: {:?}; one subscriber: delivered",
        PublishOutcome::Unroutable
    ))
}

async fn close_refuses_further_use(ctx: &Context<'_>) -> Outcome {
    let channel = ctx.channel(&ctx.class("Close"), &ctx.unique("d"), &ctx.unique("s"))?;
    let closing = ctx.connect().await?;
    let publisher = ctx.connect().await?;
    let mut subscriptions = vec![(
        "the fan-out subscription",
        subscribe(ctx, &closing, SubscribeOptions::new(exact(&channel)?)).await?,
    )];
    if ctx.capabilities.consumer_groups {
        let options = SubscribeOptions::new(exact(&channel)?).group(ctx.unique("close"));
        subscriptions.push(("the group member", subscribe(ctx, &closing, options).await?));
    }
    for seq in 0..3 {
        publish_one(ctx, &publisher, ctx.numbered(&channel, 0, seq)).await?;
    }
    for (name, subscription) in &mut subscriptions {
        match bounded(ctx.wait, format!("{name} receiving"), subscription.next()).await? {
            Some(delivery) => delivery.ack().await.during("acknowledging")?,
            None => fail!("{name} ended before its connection closed"),
        }
    }
    let mut problems = Vec::new();
    // The fan-out subscription holds the other two messages, unread, when its connection closes.
    // `buffered()` has no notification, so this polls it (bounded).
    let held = {
        let deadline = Instant::now() + ctx.wait;
        loop {
            let held = subscriptions[0].1.buffered();
            if held >= 2 || Instant::now() >= deadline {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if held < 2 {
        problems.push(format!(
            "only {held} of 2 published messages reached the fan-out subscription's buffer within {:?}",
            ctx.wait
        ));
    }
    bounded(ctx.wait, "close()", closing.close())
        .await?
        .during("close()")?;
    for (index, (name, subscription)) in subscriptions.iter_mut().enumerate() {
        let deadline = Instant::now() + ctx.wait;
        let mut read = 0;
        loop {
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(Some(delivery)) => {
                    read += 1;
                    delivery.discard();
                }
                Ok(None) => break,
                Err(_) => {
                    problems.push(format!(
                        "{name}'s stream did not end within {:?} after its connection closed ({read} buffered \
                         deliveries read meanwhile)",
                        ctx.wait
                    ));
                    break;
                }
            }
        }
        if index == 0 && read < held {
            problems.push(format!(
                "closing the connection discarded {} of the {held} deliveries {name} had already buffered: they \
                 must stay readable, then the stream ends",
                held - read
            ));
        }
    }
    let is_closed =
        |result: &agentcomm_core::Result<()>| matches!(result, Err(Error::Closed { .. }));
    let published = bounded(
        ctx.wait,
        "publish after close",
        closing.publish(ctx.numbered(&channel, 0, 99)),
    )
    .await?
    .map(|_| ());
    if !is_closed(&published) {
        problems.push(format!(
            "publish after close() gave {published:?}, expected Err(Error::Closed)"
        ));
    }
    let subscribed = bounded(
        ctx.wait,
        "subscribe after close",
        closing.subscribe(SubscribeOptions::new(exact(&channel)?)),
    )
    .await?
    .map(|_| ());
    if !is_closed(&subscribed) {
        problems.push(format!(
            "subscribe after close() gave {subscribed:?}, expected Err(Error::Closed)"
        ));
    }
    let health = bounded(ctx.wait, "health after close", closing.health()).await?;
    if health.connected {
        problems.push(format!(
            "health() after close() says connected ({:?}: {})",
            health.status, health.detail
        ));
    }
    bounded(ctx.wait, "a second close()", closing.close())
        .await?
        .ok();
    // The other connections go on.
    let other = ctx.connect().await?;
    let mut subscription = subscribe(ctx, &other, SubscribeOptions::new(exact(&channel)?)).await?;
    publish_one(ctx, &publisher, ctx.numbered(&channel, 1, 0)).await?;
    match bounded(
        ctx.wait,
        "receiving on another connection",
        subscription.next(),
    )
    .await?
    {
        Some(delivery) => delivery.ack().await.during("acknowledging")?,
        None => problems
            .push("another connection's subscription ended when one connection closed".into()),
    }
    failures(problems)?;
    Ok(format!(
        "close() ended {} subscription stream(s) after what they held ({held} buffered in the fan-out one); publish and subscribe then \
         failed with Error::Closed; other connections kept working",
        subscriptions.len()
    ))
}

/// A connection subscribed to `channel` (in a group where the backend has groups) that holds one
/// delivery, unsettled, so that its `close()` has something to wait for.
async fn holding_one(
    ctx: &Context<'_>,
    connection: &SharedRouter,
    publisher: &SharedRouter,
    channel: &Channel,
    seq: u64,
) -> Outcome<(Subscription, Delivery)> {
    let options = SubscribeOptions::new(exact(channel)?);
    let options = if ctx.capabilities.consumer_groups {
        options.group(ctx.unique(&format!("close_twice_{seq}")))
    } else {
        options
    };
    let mut subscription = subscribe(ctx, connection, options).await?;
    publish_one(ctx, publisher, ctx.numbered(channel, 0, seq)).await?;
    match bounded(ctx.wait, "receiving", subscription.next()).await? {
        Some(delivery) => Ok((subscription, delivery)),
        None => fail!("the subscription ended before its connection closed"),
    }
}

async fn close_twice_or_cut_short(ctx: &Context<'_>) -> Outcome {
    let channel = ctx.channel(&ctx.class("CloseTwice"), &ctx.unique("d"), &ctx.unique("s"))?;
    let publisher = ctx.connect().await?;
    let mut problems = Vec::new();
    let is_closed = |result: &agentcomm_core::Result<PublishOutcome>| {
        matches!(result, Err(Error::Closed { .. }))
    };

    // 1. Two closes at once while a delivery is held: the second returns no earlier than the first.
    let twice = ctx.connect().await?;
    let (_subscription, held) = holding_one(ctx, &twice, &publisher, &channel, 0).await?;
    ctx.phase("closing twice at once while a delivery is held");
    let first = tokio::spawn({
        let connection = twice.clone();
        async move { connection.close().await }
    });
    // Time for the first close to begin waiting (these sleeps create the condition checked).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn({
        let connection = twice.clone();
        async move { connection.close().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if second.is_finished() && !first.is_finished() {
        problems.push(
            "a second close() returned while the first was still closing (waiting for a held \
             delivery): a caller of close() must be able to rely on the connection being closed"
                .to_string(),
        );
    }
    drop(held);
    for (name, close) in [("the first close()", first), ("the second close()", second)] {
        match bounded(ctx.wait, name, close).await? {
            Ok(Ok(())) => {}
            Ok(Err(error)) => problems.push(format!("{name} failed: {error}")),
            Err(error) => problems.push(format!("{name}'s task failed: {error}")),
        }
    }

    // 2. A close cut short right after it began, then closed again.
    let proxy = match ctx.broker_address() {
        None => None,
        Some(address) => Some(
            bounded(
                ctx.wait,
                "starting the fault proxy",
                crate::proxy::FaultProxy::start(address),
            )
            .await?
            .during(format!("starting the fault proxy to {address}"))?,
        ),
    };
    let through = match &proxy {
        Some(proxy) => ctx.connect_through(proxy.local_addr()).await?,
        None => None,
    };
    let (cut, proxy) = match through {
        Some(connection) => (connection, proxy),
        None => (ctx.connect().await?, None),
    };
    let (mut subscription, held) = holding_one(ctx, &cut, &publisher, &channel, 1).await?;
    ctx.phase("closing, cut short right after it began");
    {
        let mut closing = std::pin::pin!(cut.close());
        let _ = futures::poll!(closing.as_mut());
    }
    // Settled by an acknowledgement, not dropped: a delivery given back before the close stopped its
    // subscription (the close's own task may not have run yet) is delivered again into `subscription`,
    // unread here until the close is over, and the close then waits its whole close timeout for it.
    // Whether the acknowledgement still counts (the close may have released it) is not checked.
    let _ = bounded(ctx.wait, "acknowledging the held delivery", held.ack()).await?;
    ctx.phase("closing again after a close cut short");
    if let Err(error) = bounded(ctx.wait, "close() after one cut short", cut.close()).await? {
        problems.push(format!("close() after one cut short failed: {error}"));
    }
    let published = bounded(
        ctx.wait,
        "publish after close",
        cut.publish(ctx.numbered(&channel, 0, 99)),
    )
    .await?;
    if !is_closed(&published) {
        problems.push(format!(
            "publish after a close cut short and a second close gave {published:?}, expected Err(Error::Closed)"
        ));
    }
    let health = bounded(ctx.wait, "health after close", cut.health()).await?;
    if health.connected {
        problems.push(format!(
            "health() after a close cut short and a second close says connected ({:?}: {})",
            health.status, health.detail
        ));
    }
    let ended = tokio::time::timeout(ctx.wait, async {
        while let Some(delivery) = subscription.next().await {
            delivery.discard();
        }
    })
    .await;
    if ended.is_err() {
        problems.push(format!(
            "the subscription's stream did not end within {:?} after a close cut short and a second close",
            ctx.wait
        ));
    }
    let connections = match &proxy {
        None => "not counted (no fault proxy: ConformanceBackend::broker_address or connect_through gave None)"
            .to_string(),
        Some(proxy) => {
            ctx.phase("waiting for every connection through the fault proxy to close");
            let deadline = Instant::now() + ctx.wait;
            while proxy.stats().live > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let live = proxy.stats().live;
            if live > 0 {
                problems.push(format!(
                    "{live} connection(s) to the broker still open {:?} after a close cut short and a second \
                     close() returned",
                    ctx.wait
                ));
            }
            "every connection through the fault proxy closed".to_string()
        }
    };
    failures(problems)?;
    Ok(format!(
        "a second close() waited for the first; a close cut short was finished by closing again: publish \
         failed with Error::Closed, health said disconnected, the stream ended; {connections}"
    ))
}

/// How long a publish whose bytes the fault proxy holds back is given: one that resolves `Ok` within
/// it claimed a confirmation the broker could not have sent.
const HELD_PUBLISH: Duration = Duration::from_millis(500);

/// The stream of the message published while the proxy holds every byte: it may or may not arrive
/// later (a backend may send it again after reconnecting), so it is not counted.
const HELD_STREAM: u32 = 2;

async fn publish_confirms(ctx: &Context<'_>) -> Outcome {
    let count = ctx.size(20) as u64;
    let channel = ctx.channel(&ctx.class("Confirms"), &ctx.unique("d"), &ctx.unique("s"))?;
    let subscriber = ctx.connect().await?;
    let sink = ctx.sink("the subscriber");
    let _feeder = feed(
        ctx,
        &subscriber,
        SubscribeOptions::new(exact(&channel)?),
        &sink,
        0,
        Settle::Ack,
    )
    .await?;
    let mut expected = Tally::new("check");
    let mut problems = Vec::new();

    // 1. A publisher that closes right after its publishes resolved: all of them were the broker's.
    let publisher = ctx.connect().await?;
    for seq in 0..count {
        publish_one(ctx, &publisher, ctx.numbered(&channel, 0, seq)).await?;
    }
    ctx.phase("closing the publisher right after its last publish resolved");
    bounded(ctx.wait, "closing the publisher", publisher.close())
        .await?
        .during("closing the publisher right after its last publish")?;
    expected.expect_stream(0, count);

    // 2. Through the fault proxy: a publish that resolved survives its connection being cut at once,
    //    and a publish whose bytes are held back does not resolve Ok.
    let proxied = match ctx.broker_address() {
        None => None,
        Some(address) => {
            ctx.phase("starting the fault proxy");
            let proxy = bounded(
                ctx.wait,
                "starting the fault proxy",
                crate::proxy::FaultProxy::start(address),
            )
            .await?
            .during(format!("starting the fault proxy to {address}"))?;
            ctx.connect_through(proxy.local_addr())
                .await?
                .map(|first| (proxy, first))
        }
    };
    let proxy_checked = proxied.is_some();
    let through_proxy = match proxied {
        None => "not checked through the fault proxy (ConformanceBackend::broker_address or \
                 connect_through gave None)"
            .to_string(),
        Some((proxy, first)) => {
            publish_one(ctx, &first, ctx.numbered(&channel, 1, 0)).await?;
            proxy.cut_all();
            expected.expect(1, 0);
            let second = ctx
                .connect_through(proxy.local_addr())
                .await?
                .ok_or_else(|| {
                    Failure::Failed("connect_through() gave None the second time".into())
                })?;
            // A round trip first, so that the connection is up before its bytes are held.
            publish_one(ctx, &second, ctx.numbered(&channel, 1, 1)).await?;
            expected.expect(1, 1);
            proxy.blackhole(true);
            ctx.phase("publishing while the fault proxy holds every byte");
            let held = tokio::time::timeout(
                HELD_PUBLISH,
                second.publish(ctx.numbered(&channel, HELD_STREAM, 0)),
            )
            .await;
            // What was held is discarded with the connection.
            proxy.cut_all();
            proxy.blackhole(false);
            let held = match held {
                Ok(Ok(outcome)) => {
                    problems.push(format!(
                        "a publish resolved Ok({outcome:?}) while the fault proxy held back every byte between the \
                         connection and the broker: it did not wait for the broker (the backend claims \
                         publish_confirms)"
                    ));
                    "resolved Ok".to_string()
                }
                Ok(Err(error)) => format!("failed ({error})"),
                Err(_) => format!("had not resolved after {HELD_PUBLISH:?}"),
            };
            format!(
                "through the fault proxy, a message whose publish resolved arrived although the connection was cut \
                 at once, and a publish whose bytes were held back {held}"
            )
        }
    };

    let mut wanted: Vec<Key> = (0..count).map(|seq| (0, seq)).collect();
    if proxy_checked {
        wanted.extend([(1, 0), (1, 1)]);
    }
    let window = ctx.window();
    sink.wait_keys(&wanted, window.remaining()).await;
    let waited = window.elapsed();
    sink.settle(ctx.settle).await;
    let mut tally = expected.clone();
    tally.record_all(
        sink.keys(None)
            .into_iter()
            .filter(|(stream, _)| *stream != HELD_STREAM),
    );
    let report = tally.report();
    if let Some(problem) = ctx.judge("the subscriber", &report, sink.foreign(), waited, false) {
        problems.insert(
            0,
            format!(
                "{problem} (every one of these publishes had resolved Ok: the broker had them)"
            ),
        );
    }
    failures(problems)?;
    Ok(format!(
        "{count} messages whose publish resolved arrived although the publisher closed right after; {through_proxy}: \
         {report}"
    ))
}
