//! What `#[derive(Message)]` gives a message type: class, channels, direction and validation.

use agentcomm_core::channel::TemplatePart;
use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest {
    #[message(min = 0.01, max = 1_000_000.0)]
    amount: f64,
    #[message(non_empty)]
    user_id: String,
    payment_method: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(
    name = "payments.Refund",
    channel = "payments.{direction}.{session_id}"
)]
struct Refund {
    #[message(min = 1)]
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(validate = Self::check)]
struct Transfer {
    from: String,
    to: String,
}

impl Transfer {
    fn check(&self) -> Result<(), ValidationError> {
        if self.from == self.to {
            return Err(ValidationError::new("to", "differs_from_sender")
                .with_detail("cannot transfer to yourself"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
enum GameEvent {
    Joined { player: String },
    Left { player: String },
}

#[test]
fn the_class_is_the_type_name_unless_renamed() {
    assert_eq!(PaymentRequest::CLASS, "PaymentRequest");
    assert_eq!(Refund::CLASS, "payments.Refund");
    assert_eq!(GameEvent::CLASS, "GameEvent");
}

#[test]
fn the_default_channel_is_class_direction_session() {
    let channel = PaymentRequest::channel("request", "session456").unwrap();
    assert_eq!(channel.name(), "PaymentRequest:request:session456");
    let parsed = parse_channel(channel.name()).unwrap();
    assert_eq!(
        (parsed.class(), parsed.direction(), parsed.session()),
        ("PaymentRequest", "request", "session456")
    );
    assert_eq!(PaymentRequest::DIRECTION, "request");
    assert_eq!(Transfer::DIRECTION, "event");
    assert_eq!(PaymentRequest::pattern().to_string(), "PaymentRequest:*:*");
}

#[test]
fn a_custom_template_names_the_channel_and_is_checked_when_compiled() {
    assert_eq!(
        Refund::TEMPLATE.source(),
        "payments.{direction}.{session_id}"
    );
    assert_eq!(
        Refund::TEMPLATE.parts(),
        &[
            TemplatePart::Literal("payments."),
            TemplatePart::Direction,
            TemplatePart::Literal("."),
            TemplatePart::Session
        ]
    );
    let channel = Refund::channel("request", "s1").unwrap();
    assert_eq!(channel.name(), "payments.request.s1");
    assert_eq!(channel.canonical(), "payments.Refund:request:s1");
    // The pattern of the type renders with its template for brokers that match names.
    assert_eq!(
        Refund::pattern().render("*", |s| s.to_string()),
        "payments.*.*"
    );
    let error = Refund::channel("re.quest", "s1").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("'.' separates it from the next component"),
        "{error}"
    );
}

#[test]
fn field_rules_name_the_field_and_the_rule() {
    let valid = PaymentRequest {
        amount: 10.0,
        user_id: "u1".into(),
        payment_method: "card".into(),
    };
    assert_eq!(valid.validate(), Ok(()));

    let cases = [
        (
            PaymentRequest {
                amount: 0.0,
                ..valid.clone()
            },
            "amount",
            "min",
        ),
        (
            PaymentRequest {
                amount: f64::NAN,
                ..valid.clone()
            },
            "amount",
            "min",
        ),
        (
            PaymentRequest {
                amount: 2e6,
                ..valid.clone()
            },
            "amount",
            "max",
        ),
        (
            PaymentRequest {
                user_id: "  ".into(),
                ..valid.clone()
            },
            "user_id",
            "non_empty",
        ),
    ];
    for (message, field, rule) in cases {
        let error = message.validate().unwrap_err();
        assert_eq!((error.field(), error.rule()), (field, rule), "{message:?}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("field `{field}` breaks rule `{rule}`")),
            "{error}"
        );
    }
    assert_eq!(Refund { cents: 0 }.validate().unwrap_err().rule(), "min");
}

/// `non_empty` takes the standard collections, not only `Vec` and the maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Roster {
    #[message(non_empty)]
    players: std::collections::HashSet<String>,
    #[message(non_empty)]
    ranks: std::collections::BTreeSet<u32>,
    #[message(non_empty)]
    queue: std::collections::VecDeque<String>,
    #[message(non_empty)]
    motto: Box<str>,
}

#[test]
fn non_empty_checks_sets_queues_and_boxed_strings() {
    let full = Roster {
        players: ["ann".to_string()].into(),
        ranks: [1].into(),
        queue: ["bob".to_string()].into(),
        motto: "win".into(),
    };
    assert_eq!(full.validate(), Ok(()));
    let cases = [
        (
            Roster {
                players: Default::default(),
                ..full.clone()
            },
            "players",
        ),
        (
            Roster {
                ranks: Default::default(),
                ..full.clone()
            },
            "ranks",
        ),
        (
            Roster {
                queue: Default::default(),
                ..full.clone()
            },
            "queue",
        ),
        (
            Roster {
                motto: " ".into(),
                ..full.clone()
            },
            "motto",
        ),
    ];
    for (roster, field) in cases {
        let error = roster.validate().unwrap_err();
        assert_eq!((error.field(), error.rule()), (field, "non_empty"));
    }
}

/// Optional fields with bounds: the bound is of the type inside, and an absent value passes. Before, a
/// bound of the inner type did not compile (`expected Option<f64>, found floating-point number`, with
/// the hint to wrap it in `Some`), and the hinted `min = Some(0.05)` refused every offer without a
/// discount (`None` is below every `Some`) while `max = Some(..)` let it through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Offer {
    #[message(min = 0.05, max = 0.5)]
    discount: Option<f64>,
    #[message(min = 1)]
    quantity: std::option::Option<u32>,
}

#[test]
fn bounds_on_an_optional_field_check_its_value_and_let_none_pass() {
    let none = Offer {
        discount: None,
        quantity: None,
    };
    assert_eq!(none.validate(), Ok(()), "an absent value breaks no bound");
    let within = Offer {
        discount: Some(0.2),
        quantity: Some(3),
    };
    assert_eq!(within.validate(), Ok(()));
    let cases = [
        (
            Offer {
                discount: Some(0.01),
                ..within.clone()
            },
            ("discount", "min"),
            "must be at least 0.05, got 0.01",
        ),
        (
            Offer {
                discount: Some(0.9),
                ..within.clone()
            },
            ("discount", "max"),
            "must be at most 0.5, got 0.9",
        ),
        (
            Offer {
                quantity: Some(0),
                ..within.clone()
            },
            ("quantity", "min"),
            "must be at least 1, got 0",
        ),
    ];
    for (offer, broken, detail) in cases {
        let error = offer.validate().unwrap_err();
        assert_eq!((error.field(), error.rule()), broken, "{offer:?}");
        assert_eq!(error.detail(), Some(detail), "{offer:?}");
    }
}

/// A bound written as an `Option`, what an optional field needed before its bounds applied to the value
/// inside (`max = Some(0.5)`, as the compiler hinted): such programs compiled and must still compile and
/// keep their meaning, the Options compared (`None` is below every `Some`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct OfferBoundByOptions {
    #[message(max = Some(0.5))]
    discount: Option<f64>,
    #[message(min = Some(1))]
    quantity: Option<u32>,
}

#[test]
fn a_bound_written_as_an_option_still_compiles_and_compares_options() {
    let fine = OfferBoundByOptions {
        discount: None,
        quantity: Some(2),
    };
    assert_eq!(fine.validate(), Ok(()));
    let error = OfferBoundByOptions {
        discount: Some(0.9),
        ..fine.clone()
    }
    .validate()
    .unwrap_err();
    assert_eq!((error.field(), error.rule()), ("discount", "max"));
    assert_eq!(
        error.detail(),
        Some("must be at most Some(0.5), got Some(0.9)")
    );
    let error = OfferBoundByOptions {
        quantity: None,
        ..fine
    }
    .validate()
    .unwrap_err();
    assert_eq!((error.field(), error.rule()), ("quantity", "min"));
    assert_eq!(error.detail(), Some("must be at least Some(1), got None"));
}

#[test]
fn a_validation_hook_runs_with_the_field_rules() {
    let error = Transfer {
        from: "a".into(),
        to: "a".into(),
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "field `to` breaks rule `differs_from_sender`: cannot transfer to yourself"
    );
    assert!(
        Transfer {
            from: "a".into(),
            to: "b".into()
        }
        .validate()
        .is_ok()
    );
}

/// The hook's path written as a string, as serde writes its paths (and as `crate = ".."` is accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(validate = "Self::check")]
struct Gift {
    to: String,
}

impl Gift {
    fn check(&self) -> Result<(), ValidationError> {
        if self.to == "nobody" {
            return Err(ValidationError::new("to", "somebody"));
        }
        Ok(())
    }
}

#[test]
fn a_validation_hook_may_be_named_by_a_string() {
    let error = Gift {
        to: "nobody".into(),
    }
    .validate()
    .unwrap_err();
    assert_eq!((error.field(), error.rule()), ("to", "somebody"));
    assert!(Gift { to: "a".into() }.validate().is_ok());
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Item {
    #[message(non_empty)]
    sku: String,
    #[message(min = 1)]
    qty: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Shipping {
    #[message(non_empty)]
    country: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct Order {
    #[message(non_empty, nested)]
    items: Vec<Item>,
    #[message(nested)]
    shipping: Option<Box<Shipping>>,
    #[message(nested)]
    gifts: std::collections::BTreeMap<String, Item>,
    #[message(nested)]
    first: Item,
    /// Not checked: no `nested`.
    unchecked: Option<Item>,
}

fn item(sku: &str, qty: u32) -> Item {
    Item {
        sku: sku.into(),
        qty,
    }
}

fn order() -> Order {
    Order {
        items: vec![item("a-1", 1), item("b-2", 2)],
        shipping: Some(Box::new(Shipping {
            country: "NL".into(),
        })),
        gifts: [("card".to_string(), item("c-3", 1))].into(),
        first: item("a-1", 1),
        unchecked: Some(item("", 0)),
    }
}

/// `nested` checks the rules of messages inside a message, through Vec, Option, Box and maps, and
/// the error names the path to the value. Before, there was no such rule: an `Order` whose second
/// item had an empty `sku` was valid, published and handled.
#[test]
fn nested_messages_are_checked_and_the_error_names_the_path() {
    assert_eq!(order().validate(), Ok(()));
    let broken = |change: &dyn Fn(&mut Order)| {
        let mut order = order();
        change(&mut order);
        let error = order.validate().unwrap_err();
        (error.field().to_string(), error.rule().to_string())
    };
    assert_eq!(
        broken(&|o| o.items[1].sku = " ".into()),
        ("items[1].sku".into(), "non_empty".into())
    );
    assert_eq!(
        broken(&|o| o.items[0].qty = 0),
        ("items[0].qty".into(), "min".into())
    );
    assert_eq!(
        broken(&|o| o.items.clear()),
        ("items".into(), "non_empty".into())
    );
    assert_eq!(
        broken(&|o| o.shipping.as_mut().unwrap().country.clear()),
        ("shipping.country".into(), "non_empty".into())
    );
    assert_eq!(
        broken(&|o| o.gifts.get_mut("card").unwrap().qty = 0),
        ("gifts[\"card\"].qty".into(), "min".into())
    );
    assert_eq!(
        broken(&|o| o.first.sku.clear()),
        ("first.sku".into(), "non_empty".into())
    );
    // None passes; the detail of the inner rule is kept.
    let mut without = order();
    without.shipping = None;
    assert_eq!(without.validate(), Ok(()));
    let mut bad = order();
    bad.items[1].qty = 0;
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "field `items[1].qty` breaks rule `min`: must be at least 1, got 0"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(validate = Self::check)]
struct Range {
    low: u32,
    high: u32,
}

impl Range {
    /// An error about the whole message: it names no field.
    fn check(&self) -> Result<(), ValidationError> {
        match self.low <= self.high {
            true => Ok(()),
            false => Err(ValidationError::new("", "low_above_high")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Report {
    #[message(nested)]
    ranges: Vec<Range>,
}

/// A nested message's error that names no field (its type's `validate` speaks of the whole message)
/// is named by the path to that message. Before, the path ended in a dot: `ranges[1].`.
#[test]
fn a_nested_error_about_the_whole_message_is_named_by_its_path() {
    let report = Report {
        ranges: vec![Range { low: 1, high: 2 }, Range { low: 3, high: 2 }],
    };
    let error = report.validate().unwrap_err();
    assert_eq!(
        (error.field(), error.rule()),
        ("ranges[1]", "low_above_high")
    );
}

/// A nested rule that breaks refuses the publish, as the message's own rules do.
#[tokio::test]
async fn a_message_with_an_invalid_nested_message_is_not_published() {
    let runtime = Runtime::new(MemoryRouter::new());
    let mut order = order();
    order.items[1].sku.clear();
    let error = runtime.bus().publish("s1", &order).await.unwrap_err();
    assert!(
        matches!(&error, Error::Validation { .. }) && error.to_string().contains("items[1].sku"),
        "{error:?}"
    );
}

#[tokio::test]
async fn invalid_messages_are_refused_before_publishing_with_field_and_rule() {
    let runtime = Runtime::new(MemoryRouter::new());
    let message = PaymentRequest {
        amount: -5.0,
        user_id: "u1".into(),
        payment_method: "card".into(),
    };
    let error = runtime.bus().publish("s1", &message).await.unwrap_err();
    assert!(matches!(error, Error::Validation { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "invalid PaymentRequest: field `amount` breaks rule `min`: must be at least 0.01, got -5.0"
    );
    let health = runtime.router().health().await;
    assert_eq!(health.get("published"), 0, "nothing may reach the router");
}

#[agent(sends = [PaymentRequest])]
struct Checkout;

#[tokio::test]
async fn one_invalid_message_keeps_its_whole_batch_from_being_published() {
    let runtime = Runtime::new(MemoryRouter::new());
    let request = |amount: f64| PaymentRequest {
        amount,
        user_id: "u1".into(),
        payment_method: "card".into(),
    };
    let results = runtime
        .publisher::<Checkout>()
        .publish_batch("s1", vec![request(5.0), request(-1.0), request(7.0)])
        .await;
    assert_eq!(results.len(), 3);
    assert!(
        matches!(&results[1], Err(Error::Validation { .. })),
        "{:?}",
        results[1]
    );
    for at in [0, 2] {
        let error = results[at].as_ref().unwrap_err();
        assert!(matches!(error, Error::NotPublished { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .contains("another message of the batch is invalid"),
            "{error}"
        );
    }
    assert_eq!(runtime.router().health().await.get("published"), 0);

    let results = runtime
        .publisher::<Checkout>()
        .publish_batch("s1", vec![request(5.0), request(7.0)])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(runtime.router().health().await.get("published"), 2);
}

/// Raw identifiers name classes, agents and fields without their `r#`, as serde names such a field
/// and as a peer in another language names the class.
mod raw_identifiers {
    use agentcomm_core::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
    #[allow(non_camel_case_types)]
    pub struct r#type {
        #[message(non_empty)]
        pub r#ref: String,
    }

    #[agent(sends = [r#type])]
    #[allow(non_camel_case_types)]
    pub struct r#loop;

    #[test]
    fn names_come_without_the_raw_prefix() {
        assert_eq!(<r#type as Message>::CLASS, "type");
        assert_eq!(<r#loop as Agent>::NAME, "loop");
        let error = r#type {
            r#ref: String::new(),
        }
        .validate()
        .unwrap_err();
        assert_eq!(error.field(), "ref");
    }
}

/// A message that is its own agent: it receives itself and sends another type.
#[derive(Debug, Serialize, Deserialize, Message)]
#[agent(receives = [Self], sends = [Refund])]
struct Relay {
    hops: u32,
}

impl Handle<Relay> for Relay {
    async fn handle(&self, _: Relay, _: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

/// The agent macro's check that received and sent types have different classes names `Self` too;
/// it compiled to a constant outside the agent's impl, where `Self` means nothing.
#[test]
fn an_agent_that_receives_itself_may_send_another_type() {
    assert_eq!(<Relay as Agent>::RECEIVES, ["Relay"]);
    assert_eq!(<Relay as Agent>::SENDS, ["payments.Refund"]);
    let _ = Relay { hops: 0 }.hops;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct LineItem {
    #[message(non_empty)]
    sku_code: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all = "camelCase")]
struct WebOrder {
    #[message(non_empty)]
    user_id: String,
    #[serde(rename = "amt")]
    #[message(min = 1)]
    amount_cents: u64,
    #[message(nested)]
    line_items: Vec<LineItem>,
    #[serde(rename(serialize = "kind", deserialize = "kind"))]
    #[message(non_empty)]
    r#type: String,
}

/// A rule's error names the field as the message holds it on the wire, after serde's renames, as
/// serde's own errors do: a sender in another language reads `userId` in a dead letter's reason, not
/// the Rust name `user_id`. Before, every error named the Rust field.
#[test]
fn field_rules_name_the_field_as_serde_does_on_the_wire() {
    let json = r#"{"userId":"","amt":5,"lineItems":[{"skuCode":"a"}],"kind":"web"}"#;
    let order: WebOrder = serde_json::from_str(json).unwrap();
    let error = order.validate().unwrap_err();
    assert_eq!((error.field(), error.rule()), ("userId", "non_empty"));
    let named = |change: &dyn Fn(&mut WebOrder)| {
        let mut order: WebOrder = serde_json::from_str(json).unwrap();
        order.user_id = "u1".into();
        change(&mut order);
        order.validate().unwrap_err().field().to_string()
    };
    assert_eq!(named(&|o| o.amount_cents = 0), "amt");
    assert_eq!(
        named(&|o| o.line_items[0].sku_code.clear()),
        "lineItems[0].skuCode"
    );
    assert_eq!(named(&|o| o.r#type.clear()), "kind");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Address {
    #[message(non_empty)]
    country: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
struct Parcel {
    #[serde(flatten)]
    #[message(nested)]
    address: Address,
}

/// A field serde flattens holds its fields at the message's top level on the wire, and its rules'
/// errors name them there (`country`, not `address.country`).
#[test]
fn a_flattened_fields_rules_name_its_fields_at_the_top() {
    let parcel: Parcel = serde_json::from_str(r#"{"country":""}"#).unwrap();
    assert_eq!(parcel.validate().unwrap_err().field(), "country");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[serde(rename_all(serialize = "kebab-case", deserialize = "camelCase"))]
struct Migrating {
    #[serde(rename(serialize = "amount", deserialize = "amt"))]
    #[message(min = 1)]
    amount_cents: u64,
    #[message(non_empty)]
    user_id: String,
}

/// A field serde names differently when it reads a message than when it writes one: a rule's error
/// (a dead letter's reason, on the receiving side) names it as the message that broke the rule held
/// it, which is also the name serde's own errors give ("missing field `amt`"). Before, the written
/// name was given: the sender read `amount` in the reason for a payload holding `amt`.
#[test]
fn field_rules_name_the_field_as_serde_reads_it() {
    let missing = serde_json::from_str::<Migrating>(r#"{"userId":"u1"}"#)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("`amt`"), "{missing}");
    let read: Migrating = serde_json::from_str(r#"{"amt":0,"userId":"u1"}"#).unwrap();
    assert_eq!(read.validate().unwrap_err().field(), "amt");
    let read: Migrating = serde_json::from_str(r#"{"amt":5,"userId":""}"#).unwrap();
    assert_eq!(read.validate().unwrap_err().field(), "userId");
}
