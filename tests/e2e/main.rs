//! End-to-end tests of the whole suite: every component started in-process on
//! ephemeral ports, driven only through the gateway with generated clients,
//! on SQLite and on PostgreSQL.

mod activation;
mod cli;
mod consent;
mod crash;
mod crossing;
mod denials;
mod harness;
mod keys;
mod manifests;
mod privacy;
mod profiles;
mod segments;
mod tls;
