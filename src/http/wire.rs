//! Wire types more than one handler module answers with: the OpenAI-style list envelope, the
//! deletion answer and the shape of a server-sent event.

use serde::Serialize;
use utoipa::ToSchema;

/// An OpenAI-style list envelope `{"object": "list", "data": [...]}` named `$name`.
macro_rules! list_type {
    ($name:ident, $item:ty) => {
        #[derive(serde::Serialize, utoipa::ToSchema)]
        pub struct $name {
            /// Always `list`.
            pub object: &'static str,
            pub data: Vec<$item>,
        }

        impl $name {
            pub fn new(data: Vec<$item>) -> Self {
                Self {
                    object: "list",
                    data,
                }
            }
        }
    };
}
pub(crate) use list_type;

/// What a DELETE answers.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    /// `model` or `dataset`.
    pub object: &'static str,
    pub deleted: bool,
}

impl Deleted {
    pub fn new(id: String, object: &'static str) -> Self {
        Self {
            id,
            object,
            deleted: true,
        }
    }
}

/// One server-sent event of a stream (`text/event-stream`), as clients parse it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ServerSentEvent {
    /// The event's name (`progress`, `stage`, `log`, `metric`, `done`, ...); absent on the
    /// completion streams, whose events are all `message`.
    event: Option<String>,
    /// JSON text (a chunk, an event's fields), or `[DONE]` at the end of a completion stream.
    data: String,
    /// Stored job events carry their sequence number.
    id: Option<String>,
}
