//! The router named by the environment: `MESSAGING_BACKEND` = `memory` (default), `redis` or `rabbitmq`,
//! with `REDIS_URL` (and `REDIS_DELIVERY_MODE`) or `RABBITMQ_URL` (see `.env.example`).

use std::sync::Arc;

use agentcomm_core::config::{Backend, Config};
use agentcomm_core::logging::{self, LogConfig, LogGuard, LoggingError};
use agentcomm_core::router::SharedRouter;
use agentcomm_core::runtime::AgentOptions;
use agentcomm_core::{MemoryRouter, Result};
use agentcomm_redis::{DeliveryMode, RedisRouter};
use tracing::level_filters::LevelFilter;

/// Connects to the router the configuration names.
pub async fn router_from_config(config: &Config) -> Result<SharedRouter> {
    Ok(match config.backend() {
        Backend::Redis => {
            let mut builder = RedisRouter::builder(config.redis_url());
            if let Some(mode) = config.var(agentcomm_redis::DELIVERY_MODE_VAR) {
                let mode = DeliveryMode::parse(&mode).map_err(|error| config.locate(error))?;
                builder = builder.mode(mode);
            }
            Arc::new(builder.connect().await?)
        }
        Backend::RabbitMq => {
            Arc::new(agentcomm_amqp::AmqpRouter::connect(config.rabbitmq_url()).await?)
        }
        _ => Arc::new(MemoryRouter::new()),
    })
}

/// What an example's `main` starts with: the configuration (`.env` and the environment) and its
/// logging; the error as text for the user.
pub fn configure() -> std::result::Result<(Config, LogGuard), String> {
    let config = Config::load().map_err(|error| error.to_string())?;
    let guard = init_logging(&config).map_err(|error| error.to_string())?;
    Ok((config, guard))
}

/// Starts JSON Lines logging at the configuration's `LOG_LEVEL` (from the environment or `.env`), or
/// at WARNING when neither names one, so that the examples' answers stand out.
pub fn init_logging(config: &Config) -> std::result::Result<LogGuard, LoggingError> {
    let named = config
        .var(logging::LOG_LEVEL_ENV)
        .is_some_and(|level| !level.trim().is_empty());
    let level = if named {
        config.log_level()
    } else {
        LevelFilter::WARN
    };
    logging::init(LogConfig::new().level(level))
}

/// Reads `.env` and the environment, and connects.
pub async fn router_from_env() -> Result<(Config, SharedRouter)> {
    let config = Config::load()?;
    let router = router_from_config(&config).await?;
    Ok((config, router))
}

/// Agent options for `router`: the defaults, or fan-out where the backend has no consumer groups
/// (Redis pub/sub), so that the examples run on every backend.
pub fn options_for(router: &SharedRouter) -> AgentOptions {
    if router.capabilities().consumer_groups {
        AgentOptions::new()
    } else {
        AgentOptions::new().fan_out()
    }
}
