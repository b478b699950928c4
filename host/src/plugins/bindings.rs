//! Every host-side binding generated from `wit/`, in one place.
//!
//! Each world gets its own module; the shared `types` and `logging`
//! interfaces are generated once (with the `tool` world) and reused by the
//! others through `with:`, so the same Rust types flow between worlds.

pub mod tool {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tool",
        exports: { default: async },
    });
}

pub mod planner {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "planner",
        exports: { default: async },
        with: {
            "opspawn:plugin/types": super::tool::opspawn::plugin::types,
            "opspawn:plugin/logging": super::tool::opspawn::plugin::logging,
        },
    });
}

pub mod llm_adapter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "llm-adapter",
        exports: { default: async },
        with: {
            "opspawn:plugin/types": super::tool::opspawn::plugin::types,
            "opspawn:plugin/logging": super::tool::opspawn::plugin::logging,
        },
    });
}

pub use llm_adapter::opspawn::plugin::llm_stream;
pub use tool::opspawn::plugin::{logging, types};

/// The WIT package version this host was built against.
pub const WIT_PACKAGE: &str = "opspawn:plugin";
pub const WIT_VERSION: &str = "0.1.0";
