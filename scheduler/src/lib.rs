//! Kiln's scheduler: the job API, the durable store (SQLite or PostgreSQL), the seed-keyed
//! cache and single flight, dispatch to workers by tier, retries, and the embedded farm that
//! runs all of it in one process (`kiln up`).

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod costs;
pub mod dispatch;
pub mod farm;
pub mod fleet;
pub mod metrics;
pub mod orders;
pub mod registry;
pub mod results;
pub mod retention;
pub mod retry;
pub mod scheduler;
pub mod store;
pub mod tiles;
pub mod time;
pub mod waits;
