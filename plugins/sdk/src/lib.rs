//! Write Opspawn plugins in Rust.
//!
//! A plugin is a WebAssembly component (`cargo build --release --target
//! wasm32-wasip2` of a `cdylib` crate) that exports one of the worlds of
//! `opspawn:plugin@0.2.0`, whose WIT ships in this crate's `wit/` folder.
//! Each world is a trait here, and a macro exports an implementation:
//!
//! | world | trait | macro |
//! |---|---|---|
//! | `tool` | typed functions, or [`tool::ToolPlugin`] | [`register_tools!`], [`register_tool_plugin!`] |
//! | `planner` | [`planner::Planner`] | [`register_planner!`] |
//! | `llm-adapter` | [`llm::LlmAdapter`] | [`register_llm_adapter!`] |
//!
//! A tool in full:
//!
//! ```
//! use opspawn_plugin::prelude::*;
//!
//! /// Counts the words in a text.
//! #[derive(Deserialize, JsonSchema)]
//! struct Input {
//!     /// The text whose words to count.
//!     text: String,
//! }
//!
//! fn word_count(input: Input) -> ToolResult {
//!     Ok(json!({ "words": input.text.split_whitespace().count() }))
//! }
//!
//! register_tools!(word_count);
//! ```
//!
//! Stability: when a later WIT version adds an export to a world, its trait
//! gains a method with a default body, so a plugin that compiles today keeps
//! compiling. The generated bindings are private (in `__private`, for the
//! macros only); the types they define are re-exported in [`types`],
//! [`planner`] and [`llm`].
//!
//! The macros export only when building for `wasm32`: the exported symbols
//! are named like `opspawn:plugin/tools@0.2.0#invoke`, which a native
//! linker refuses in a shared library, so a native `cargo test` of the same
//! crate keeps working.

pub mod llm;
#[cfg(feature = "llm-http")]
pub mod llm_http;
pub mod log;
pub mod memory;
pub mod planner;
pub mod tool;
pub mod types;

/// The WIT package this crate builds against.
pub const WIT_PACKAGE: &str = "opspawn:plugin@0.2.0";

/// The WIT this crate binds, as shipped in its `wit/` folder.
pub const WIT: &str = include_str!("../wit/opspawn.wit");

/// What a tool's source needs, in one `use`.
pub mod prelude {
    pub use crate::register_tools;
    pub use crate::tool::{ToolError, ToolResult};
    pub use crate::types::CallContext;
    pub use schemars::JsonSchema;
    pub use serde::{Deserialize, Serialize};
    pub use serde_json::{Value, json};
}

/// For the macros only: the generated bindings, and the paths the macros
/// expand to. Not part of the API; it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use schemars;
    pub use serde_json;

    pub use crate::llm::LlmAdapterExport;
    pub use crate::planner::PlannerExport;
    pub use crate::tool::ToolExport;

    /// The `tool` world, which also defines the shared `types` and
    /// `logging` interfaces that the other two worlds reuse (`with`), so
    /// that every world speaks the same Rust types.
    pub mod tool {
        wit_bindgen::generate!({
            world: "tool",
            path: "wit",
            pub_export_macro: true,
            export_macro_name: "export_tool",
            default_bindings_module: "opspawn_plugin::__private::tool",
            additional_derives: [PartialEq],
        });
    }

    pub mod planner {
        wit_bindgen::generate!({
            world: "planner",
            path: "wit",
            with: {
                "opspawn:plugin/types@0.2.0": crate::__private::tool::opspawn::plugin::types,
                "opspawn:plugin/logging@0.2.0": crate::__private::tool::opspawn::plugin::logging,
                "opspawn:plugin/memory@0.2.0": crate::__private::tool::opspawn::plugin::memory,
            },
            pub_export_macro: true,
            export_macro_name: "export_planner",
            default_bindings_module: "opspawn_plugin::__private::planner",
            additional_derives: [PartialEq],
        });
    }

    pub mod llm_adapter {
        wit_bindgen::generate!({
            world: "llm-adapter",
            path: "wit",
            with: {
                "opspawn:plugin/types@0.2.0": crate::__private::tool::opspawn::plugin::types,
                "opspawn:plugin/logging@0.2.0": crate::__private::tool::opspawn::plugin::logging,
            },
            pub_export_macro: true,
            export_macro_name: "export_llm_adapter",
            default_bindings_module: "opspawn_plugin::__private::llm_adapter",
            additional_derives: [PartialEq],
        });
    }
}

/// Exports typed tool functions as this component's tools.
///
/// Each function takes its input (a type that is `Deserialize` and
/// `JsonSchema`), and optionally a `&CallContext` after it, and returns
/// `Result<impl Serialize, ToolError>`. The tool is named after the
/// function; its description is the one given after a colon, else the input
/// type's doc comment.
///
/// ```ignore
/// register_tools!(word_count, calculator: "Evaluates arithmetic");
/// ```
#[macro_export]
macro_rules! register_tools {
    ($($function:ident $(: $description:expr)?),+ $(,)?) => {
        /// The component's tools, as the `tool` world asks for them.
        struct __OpspawnTools;

        impl $crate::tool::ToolPlugin for __OpspawnTools {
            fn describe() -> ::std::vec::Vec<$crate::types::ToolSpec> {
                ::std::vec![$(
                    $crate::tool::describe(
                        stringify!($function),
                        ::std::option::Option::None $(.or(::std::option::Option::Some($description)))?,
                        &$function,
                    )
                ),+]
            }

            fn invoke(
                context: $crate::types::CallContext,
                name: ::std::string::String,
                input: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::tool::ToolError> {
                $(
                    if name == stringify!($function) {
                        return $crate::tool::invoke(&$function, &context, &input);
                    }
                )+
                ::std::result::Result::Err($crate::tool::ToolError::unknown_tool(
                    &name,
                    &[$(stringify!($function)),+],
                ))
            }
        }

        $crate::register_tool_plugin!(__OpspawnTools);
    };
}

/// Exports a [`tool::ToolPlugin`] as this component's `tool` world.
#[macro_export]
macro_rules! register_tool_plugin {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __OpspawnExport = $crate::__private::ToolExport<$plugin>;
            $crate::__private::tool::export_tool!(
                __OpspawnExport with_types_in $crate::__private::tool
            );
        };
        // Natively nothing is exported, but the plugin's code must still
        // count as used (no dead-code warnings in its unit tests).
        #[cfg(not(target_arch = "wasm32"))]
        #[doc(hidden)]
        pub fn __opspawn_plugin_exports() -> impl ::core::any::Any {
            [
                <$plugin as $crate::tool::ToolPlugin>::describe as usize,
                <$plugin as $crate::tool::ToolPlugin>::invoke as usize,
            ]
        }
    };
}

/// Exports a [`planner::Planner`] as this component's `planner` world.
#[macro_export]
macro_rules! register_planner {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __OpspawnExport = $crate::__private::PlannerExport<$plugin>;
            $crate::__private::planner::export_planner!(
                __OpspawnExport with_types_in $crate::__private::planner
            );
        };
        // Natively nothing is exported, but the plugin's code must still
        // count as used (no dead-code warnings in its unit tests).
        #[cfg(not(target_arch = "wasm32"))]
        #[doc(hidden)]
        pub fn __opspawn_plugin_exports() -> impl ::core::any::Any {
            [<$plugin as $crate::planner::Planner>::next_action as usize]
        }
    };
}

/// Exports an [`llm::LlmAdapter`] as this component's `llm-adapter` world.
#[macro_export]
macro_rules! register_llm_adapter {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __OpspawnExport = $crate::__private::LlmAdapterExport<$plugin>;
            $crate::__private::llm_adapter::export_llm_adapter!(
                __OpspawnExport with_types_in $crate::__private::llm_adapter
            );
        };
        // Natively nothing is exported, but the plugin's code must still
        // count as used (no dead-code warnings in its unit tests).
        #[cfg(not(target_arch = "wasm32"))]
        #[doc(hidden)]
        pub fn __opspawn_plugin_exports() -> impl ::core::any::Any {
            [<$plugin as $crate::llm::LlmAdapter>::prepare as usize]
        }
    };
}

#[cfg(test)]
mod tests {
    /// The WIT inside this crate must be the repository's `wit/v0.2.0`: the
    /// crate ships it so that it builds outside the repository, and a copy
    /// that drifted would build plugins the host cannot load.
    #[test]
    fn the_shipped_wit_is_the_repositorys_v0_2_0() {
        let repository = concat!(env!("CARGO_MANIFEST_DIR"), "/../../wit/v0.2.0/opspawn.wit");
        match std::fs::read_to_string(repository) {
            Ok(text) => assert!(
                text == super::WIT,
                "plugins/sdk/wit/opspawn.wit differs from wit/v0.2.0/opspawn.wit: copy it over"
            ),
            // Built from the published crate, outside the repository.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("reading {repository}: {error}"),
        }
    }
}
