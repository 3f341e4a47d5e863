//! An in-process stand-in for the Kubernetes API server, for tests of the cluster room at the
//! library level: every request goes to a plain function the test writes, and a kube `Client`
//! pointed at it (plain HTTP on 127.0.0.1) talks to it as to a real API server.
//!
//! The handler runs on a blocking thread, so it may wait (say, on a barrier that makes two
//! clients race) without stalling the runtime.

#![allow(dead_code)]

pub mod cluster;
pub mod receiver;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use serde_json::{Value, json};

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

pub type Handler = Arc<dyn Fn(&Request) -> (u16, Value) + Send + Sync>;

/// Serves `handler` on 127.0.0.1 until the runtime ends; a client for it.
pub async fn start(handler: Handler) -> (SocketAddr, kube::Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let handler = handler.clone();
        async move {
            let request = Request {
                method,
                path: uri.path().to_owned(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            };
            let (code, body) = tokio::task::spawn_blocking(move || handler(&request))
                .await
                .unwrap();
            (
                StatusCode::from_u16(code).unwrap(),
                [("content-type", "application/json")],
                serde_json::to_vec(&body).unwrap(),
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (addr, kube::Client::try_from(config).unwrap())
}

/// A `Status` body as the API server sends with an error.
pub fn status(code: u16, reason: &str) -> (u16, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "code": code, "reason": reason, "message": reason});
    (code, body)
}
