//! The backend-agnostic conformance suite (filled in below).
