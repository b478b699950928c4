//! The types every world shares (the WIT interface `types`): tool specs and
//! calls, chat requests and responses, and the call context.

pub use crate::__private::tool::opspawn::plugin::types::*;
