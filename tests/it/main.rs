//! End-to-end tests of Perishable: the proxy on real 127.0.0.1 sockets, in front of the mock
//! upstream (`perishable-mock`), driven with reqwest, raw TCP, the official OpenAI Python SDK and
//! headless Chromium, on the memory store and on a real `redis-server`.
//!
//! One binary, so it links once; [`support`] is the shared harness. Tests that need a program
//! this machine lacks (redis-server, the `openai` Python package, Chromium and the npm packages,
//! curl) are marked ignored with the reason in cargo's output, and fail under `CI`: see
//! `tests/build.rs`.

#![allow(clippy::unwrap_used)]

mod support;

mod abuse_gates;
mod app_attest;
mod browser;
mod browser_rules;
mod budgets;
mod client;
mod example_proxy;
mod gates;
mod metered_calls;
mod mock_upstream;
mod openai_sdk;
mod proxy;
mod readme;
mod realtime;
mod redis_cluster;
mod redis_store;
mod sessions;
mod smoke;
mod store_conformance;
mod upstream_tls;
mod usage_bytes;
mod usage_formats;
