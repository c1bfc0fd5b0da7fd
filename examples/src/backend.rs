//! The router named by the environment: `MESSAGING_BACKEND` = `memory` (default), `redis` or `rabbitmq`,
//! with `REDIS_URL` / `RABBITMQ_URL` (see `.env.example`).

use std::sync::Arc;

use agentcomm_core::config::{Backend, Config};
use agentcomm_core::router::SharedRouter;
use agentcomm_core::{MemoryRouter, Result};

/// Connects to the router the configuration names.
pub async fn router_from_config(config: &Config) -> Result<SharedRouter> {
    Ok(match config.backend() {
        Backend::Memory => Arc::new(MemoryRouter::new()),
        other => {
            return Err(agentcomm_core::Error::Config {
                variable: agentcomm_core::config::BACKEND_VAR.into(),
                value: other.to_string(),
                expected: format!("accepted values are {}", Backend::ACCEPTED),
            });
        }
    })
}

/// Reads `.env` and the environment, and connects.
pub async fn router_from_env() -> Result<(Config, SharedRouter)> {
    let config = Config::load()?;
    let router = router_from_config(&config).await?;
    Ok((config, router))
}
