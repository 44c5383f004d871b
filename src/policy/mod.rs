//! Policy stages of the request pipeline (see the architecture notes: WAF -> CORS -> auth ->
//! throttle/quota -> validate -> cache -> integration). Each stage is a plain function over the
//! parsed request that answers "continue" or "respond now with this status".

pub mod auth;
