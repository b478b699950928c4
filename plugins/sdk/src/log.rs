//! Logs through the host, which attributes each line to the plugin.
//!
//! Only components have the host's import: natively (in unit tests) these
//! functions must not be called.

use crate::__private::tool::opspawn::plugin::logging::{Level, log};

pub fn debug(message: &str) {
    log(Level::Debug, message);
}

pub fn info(message: &str) {
    log(Level::Info, message);
}

pub fn warn(message: &str) {
    log(Level::Warn, message);
}

pub fn error(message: &str) {
    log(Level::Error, message);
}
