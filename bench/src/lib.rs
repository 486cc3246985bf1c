//! Kiln's benchmarks, behind `kiln bench …`: the engine ([`engine`]), the embedded farm end to end
//! ([`farm`]), the store's writes alone ([`store`]), the distributed farm on PostgreSQL and
//! RabbitMQ ([`dispatch`]) and a fleet of edge agents ([`fleet`]). Kept out of the services: no
//! binary that serves links this crate but `kiln`. What they have measured is in
//! `docs/benchmarks.md`.

pub mod dispatch;
pub mod engine;
pub mod farm;
pub mod fleet;
pub mod stats;
pub mod store;
