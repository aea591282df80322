//! Umbrella package: the harness the end-to-end tests and examples share.
