//! Every host-side binding generated from `wit/`, in one place.
//!
//! Each released WIT version keeps its own folder (`wit/v0.1.0`,
//! `wit/v0.2.0`) and its own module here, so components built against an
//! older version keep loading after the contract moves on. Within a version,
//! each world gets its own module; the shared `types` and `logging`
//! interfaces are generated once (with the `tool` world) and reused by the
//! others through `with:`, so the same Rust types flow between worlds.

/// The WIT package every plugin is built against.
pub const WIT_PACKAGE: &str = "opspawn:plugin";

/// A WIT version this host can load components of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WitVersion {
    /// LLM adapters perform HTTP themselves through `wasi:http`.
    V0_1,
    /// LLM adapters only translate; the host performs the exchange.
    V0_2,
}

impl WitVersion {
    /// Every version this host loads, oldest first.
    pub const ALL: [WitVersion; 2] = [WitVersion::V0_1, WitVersion::V0_2];
    /// The version new plugins should be built against.
    pub const LATEST: WitVersion = WitVersion::V0_2;

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_1 => "0.1.0",
            Self::V0_2 => "0.2.0",
        }
    }

    /// The version a component names, if this host knows it exactly.
    /// wasmtime compares component types exactly, so an unknown patch or
    /// minor version could carry types this host does not have.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|version| version.as_str() == text)
    }
}

impl std::fmt::Display for WitVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `opspawn:plugin@0.1.0`, frozen: adapters call providers over `wasi:http`.
pub mod v0_1 {
    pub mod tool {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "tool",
            exports: { default: async },
        });
    }

    pub mod planner {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
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
            path: "../wit/v0.1.0",
            world: "llm-adapter",
            exports: { default: async },
            with: {
                "opspawn:plugin/types": super::tool::opspawn::plugin::types,
                "opspawn:plugin/logging": super::tool::opspawn::plugin::logging,
            },
        });
    }

    pub use llm_adapter::opspawn::plugin::llm_stream;
    pub use planner::exports::opspawn::plugin::planning;
    pub use tool::opspawn::plugin::{logging, types};
}

/// `opspawn:plugin@0.2.0`, the current version: adapters only translate.
pub mod v0_2 {
    pub mod tool {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "tool",
            exports: { default: async },
            // Memory reads and writes the store: the plugin's call waits.
            imports: {
                "opspawn:plugin/memory.remember": async,
                "opspawn:plugin/memory.recall": async,
                "opspawn:plugin/memory.forget": async,
            },
        });
    }

    pub mod planner {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "planner",
            exports: { default: async },
            with: {
                "opspawn:plugin/types": super::tool::opspawn::plugin::types,
                "opspawn:plugin/logging": super::tool::opspawn::plugin::logging,
                "opspawn:plugin/memory": super::tool::opspawn::plugin::memory,
            },
        });
    }

    pub mod llm_adapter {
        wasmtime::component::bindgen!({
            path: "../wit/v0.2.0",
            world: "llm-adapter",
            exports: { default: async },
            with: {
                "opspawn:plugin/types": super::tool::opspawn::plugin::types,
                "opspawn:plugin/logging": super::tool::opspawn::plugin::logging,
            },
        });
    }

    pub use llm_adapter::exports::opspawn::plugin::translate;
    pub use planner::exports::opspawn::plugin::planning;
    pub use tool::opspawn::plugin::{logging, memory, types};
}
