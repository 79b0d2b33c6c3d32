//! Keyward's pure domain: the token format, the scope algebra, CIDR sets, validated values,
//! secrets that never print, the injected clock, and the authorization checks as pure functions.
//!
//! Nothing in this crate does IO (beyond drawing random bytes from the OS CSPRNG), knows HTTP or
//! knows SQL. It is where the rules live, so it is where property tests hammer them.

pub mod auth;
pub mod cidr;
pub mod clock;
pub mod gcra;
pub mod model;
pub mod quota;
pub mod rules;
pub mod scope;
pub mod secret;
pub mod token;
pub mod validate;
