//! Named custom-event handlers registered on the server builder
//! ([`ServerBuilder::on_event`](crate::server::ServerBuilder::on_event)): a typed function per
//! event name, instead of an extension that matches names in `on_custom_event`.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::hooks::{CustomEventPayload, Extension, HookError};

/// One call of a named event handler.
#[derive(Debug, Clone)]
pub struct EventCall<Req> {
    /// The document the event is about (the handler runs on its owner).
    pub document: String,
    /// The payload, decoded from the caller's JSON.
    pub payload: Req,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A handler, boxed.
type Handler<Req, Resp> =
    Box<dyn Fn(EventCall<Req>) -> BoxFuture<Result<Resp, HookError>> + Send + Sync>;

/// The extension behind one named handler.
pub(crate) struct NamedEvent<Req, Resp> {
    name: String,
    f: Handler<Req, Resp>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> NamedEvent<Req, Resp> {
    pub(crate) fn new<F, Fut>(name: String, f: F) -> Self
    where
        F: Fn(EventCall<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, HookError>> + Send + 'static,
    {
        NamedEvent {
            name,
            f: Box::new(move |call| Box::pin(f(call))),
            _types: PhantomData,
        }
    }
}

#[async_trait]
impl<Req, Resp> Extension for NamedEvent<Req, Resp>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn on_custom_event(
        &self,
        p: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        if p.name != self.name {
            return Ok(None);
        }
        let bytes = if p.payload.iter().all(u8::is_ascii_whitespace) {
            b"null".as_slice()
        } else {
            p.payload
        };
        let payload: Req = serde_json::from_slice(bytes)
            .map_err(|e| HookError::reject(format!("bad payload for {}: {e}", self.name)))?;
        let reply = (self.f)(EventCall {
            document: p.document_name.to_owned(),
            payload,
        })
        .await?;
        serde_json::to_vec(&reply)
            .map(Some)
            .map_err(|e| HookError::reject(format!("encoding the reply of {}: {e}", self.name)))
    }
}
