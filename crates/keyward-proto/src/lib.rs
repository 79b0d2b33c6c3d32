//! Keyward's wire types, shared by the server, the client SDK and the tests: request and response
//! bodies, the error body, and the one table of error codes (code, HTTP status, default message).

pub mod error;
pub mod ts;
pub mod types;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use types::*;
