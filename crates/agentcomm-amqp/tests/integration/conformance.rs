//! The testkit's conformance suite against a real RabbitMQ (RABBITMQ_URL, default
//! amqp://guest:guest@127.0.0.1:5672/%2f), with the capabilities the router declares.

use crate::common;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_amqp::{AmqpRouter, topology};
use agentcomm_core::channel::Channel;
use agentcomm_core::error::{Result, redact_url};
use agentcomm_core::router::{BoxFuture, Capabilities, Router, SharedRouter};
use agentcomm_testkit::conformance::ConformanceBackend;

/// One scenario's broker: its own exchange (so scenarios running at once do not see each other), and
/// every router it opened, so that what they declared is deleted afterwards.
struct RabbitMq {
    url: String,
    exchange: String,
    routers: Mutex<Vec<AmqpRouter>>,
}

impl RabbitMq {
    fn new() -> Self {
        RabbitMq {
            url: common::url(),
            exchange: common::unique("conformance"),
            routers: Mutex::new(Vec::new()),
        }
    }
}

impl RabbitMq {
    /// A new connection to `url`, configured for the scenarios.
    fn connect_to(&self, url: String) -> BoxFuture<'_, Option<SharedRouter>> {
        Box::pin(async move {
            let reachable = matches!(
                tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(common::broker_address()),
                )
                .await,
                Ok(Ok(_))
            );
            if !reachable {
                return None;
            }
            let connecting = AmqpRouter::builder(&url)
                .exchange(&self.exchange)
                .connect_timeout(Duration::from_secs(5))
                .close_timeout(Duration::from_secs(5))
                .connect();
            let router = match tokio::time::timeout(Duration::from_secs(15), connecting).await {
                Ok(Ok(router)) => router,
                Ok(Err(error)) => panic!("RabbitMQ answers, but connecting failed: {error}"),
                Err(_) => panic!("RabbitMQ answers, but connecting took more than 15 s"),
            };
            assert_eq!(router.capabilities(), self.declared_capabilities());
            self.routers.lock().unwrap().push(router.clone());
            Some(Arc::new(router) as SharedRouter)
        })
    }
}

impl ConformanceBackend for RabbitMq {
    fn name(&self) -> &str {
        "rabbitmq"
    }

    fn declared_capabilities(&self) -> Capabilities {
        Capabilities::none()
            .persistent(true)
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
            .reports_unroutable(true)
    }

    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        self.connect_to(self.url.clone())
    }

    /// The broker's address when it is on loopback (the fault proxy's only target).
    fn broker_address(&self) -> Option<SocketAddr> {
        let address = common::broker_address().to_socket_addrs().ok()?.next()?;
        address.ip().is_loopback().then_some(address)
    }

    fn connect_through(&self, address: SocketAddr) -> BoxFuture<'_, Option<SharedRouter>> {
        self.connect_to(common::through(&self.url, address))
    }

    fn unreachable(&self) -> String {
        format!("no RabbitMQ at {}", redact_url(&self.url))
    }

    fn publish_raw(&self, channel: &Channel, frame: Vec<u8>) -> BoxFuture<'_, Result<bool>> {
        let key = topology::routing_key(channel);
        Box::pin(async move {
            let key = key?;
            let raw = common::Raw::open().await;
            raw.publish(&self.exchange, &key, &frame).await;
            raw.close().await;
            Ok(true)
        })
    }
}

impl Drop for RabbitMq {
    /// Deletes the exchanges and durable queues the scenario's routers declared (its fan-out queues
    /// were deleted when they closed).
    fn drop(&mut self) {
        let mut queues: Vec<String> = self
            .routers
            .lock()
            .unwrap()
            .iter()
            .flat_map(AmqpRouter::declared_queues)
            .collect();
        queues.sort();
        queues.dedup();
        let exchange = self.exchange.clone();
        // Drop runs inside the scenario's runtime: clean up on a thread with a runtime of its own.
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Some(raw) = common::Raw::try_open().await {
                    raw.cleanup(&exchange, &queues).await;
                    raw.close().await;
                }
            });
        });
        let _ = cleaning.join();
    }
}

agentcomm_testkit::conformance_tests!(RabbitMq::new());
