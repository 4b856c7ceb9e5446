//! [`BoxStore`]: any [`Store`] behind one type, to pick the backend at run time.
//!
//! [`Store`] returns `impl Future` from its methods (as fred does), which keeps the layer
//! free of boxing and dynamic dispatch but means there is no `dyn Store`. An application
//! that chooses its store from configuration (memory in development, Redis or Postgres in
//! production) wraps the one it built in a `BoxStore`, and every layer, router and
//! function is written once for `IdempotencyLayer<BoxStore>`. The cost is one boxed
//! future (an allocation) and a dynamic call per store call; `cargo bench --bench layer`
//! shows it next to the generic store.
//!
//! # Example
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_idempotency_core::{BoxStore, IdempotencyLayer, MemoryStore};
//!
//! fn store_from_config(kind: &str) -> BoxStore {
//!     match kind {
//!         // "redis" => BoxStore::new(RedisStore::connect(url).await?),
//!         _ => BoxStore::new(MemoryStore::default()),
//!     }
//! }
//!
//! let layer: IdempotencyLayer<BoxStore> =
//!     IdempotencyLayer::new(store_from_config("memory")).global_scope();
//! let app: Router = Router::new().route("/payments", post(|| async { "paid" }).route_layer(layer));
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::fingerprint::{Fingerprint, ScopeHash};
use crate::record::Record;
use crate::store::{
    Completion, KeyState, LeaseTerms, Reservation, Resolved, Store, StoreError, Subscription,
};
use crate::token::FencingToken;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A [`Store`] of any kind, chosen at run time. Cheap to clone (one `Arc`). See the
/// [module docs](crate::boxed).
#[derive(Clone)]
pub struct BoxStore {
    inner: Arc<dyn DynStore>,
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxStore")
            .field("store", &self.inner.name())
            .finish_non_exhaustive()
    }
}

impl BoxStore {
    /// Boxes `store`. Boxing a `BoxStore` again returns it as it is.
    pub fn new<St: Store>(store: St) -> Self {
        let any: &dyn std::any::Any = &store;
        if let Some(boxed) = any.downcast_ref::<BoxStore>() {
            return boxed.clone();
        }
        BoxStore {
            inner: Arc::new(store),
        }
    }
}

/// A [`Subscription`] of a [`BoxStore`].
pub struct BoxSubscription {
    inner: Box<dyn DynSubscription>,
}

impl fmt::Debug for BoxSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxSubscription").finish_non_exhaustive()
    }
}

impl Subscription for BoxSubscription {
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        self.inner.changed()
    }
}

/// The object-safe twin of [`Subscription`].
trait DynSubscription: Send + 'static {
    fn changed(&mut self) -> BoxFuture<'_, ()>;
}

impl<S: Subscription> DynSubscription for S {
    fn changed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(Subscription::changed(self))
    }
}

/// The object-safe twin of [`Store`]: the same methods, with boxed futures.
trait DynStore: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn reserve<'a>(
        &'a self,
        scope: &'a ScopeHash,
        fingerprint: &'a Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>>;
    fn renew<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn complete<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Completion, StoreError>>;
    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    );
    fn release<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn subscribe<'a>(
        &'a self,
        scope: &'a ScopeHash,
    ) -> BoxFuture<'a, Result<BoxSubscription, StoreError>>;
    fn inspect<'a>(&'a self, scope: &'a ScopeHash) -> BoxFuture<'a, Result<KeyState, StoreError>>;
    fn forget<'a>(&'a self, scope: &'a ScopeHash) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn resolve<'a>(
        &'a self,
        scope: &'a ScopeHash,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Resolved, StoreError>>;
}

impl<St: Store> DynStore for St {
    fn name(&self) -> &'static str {
        Store::name(self)
    }

    fn reserve<'a>(
        &'a self,
        scope: &'a ScopeHash,
        fingerprint: &'a Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(Store::reserve(self, scope, fingerprint, token, lease))
    }

    fn renew<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::renew(self, scope, token, lease))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Completion, StoreError>> {
        Box::pin(Store::complete(self, scope, token, record, ttl))
    }

    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    ) {
        Store::owner_extensions(self, scope, token, extensions);
    }

    fn release<'a>(
        &'a self,
        scope: &'a ScopeHash,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::release(self, scope, token))
    }

    fn subscribe<'a>(
        &'a self,
        scope: &'a ScopeHash,
    ) -> BoxFuture<'a, Result<BoxSubscription, StoreError>> {
        Box::pin(async move {
            let subscription = Store::subscribe(self, scope).await?;
            Ok(BoxSubscription {
                inner: Box::new(subscription),
            })
        })
    }

    fn inspect<'a>(&'a self, scope: &'a ScopeHash) -> BoxFuture<'a, Result<KeyState, StoreError>> {
        Box::pin(Store::inspect(self, scope))
    }

    fn forget<'a>(&'a self, scope: &'a ScopeHash) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::forget(self, scope))
    }

    fn resolve<'a>(
        &'a self,
        scope: &'a ScopeHash,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Resolved, StoreError>> {
        Box::pin(Store::resolve(self, scope, record, ttl))
    }
}

impl Store for BoxStore {
    type Subscription = BoxSubscription;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn reserve(
        &self,
        scope: &ScopeHash,
        fingerprint: &Fingerprint,
        token: FencingToken,
        lease: LeaseTerms,
    ) -> Result<Reservation, StoreError> {
        self.inner.reserve(scope, fingerprint, token, lease).await
    }

    async fn renew(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(scope, token, lease).await
    }

    async fn complete(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        self.inner.complete(scope, token, record, ttl).await
    }

    fn owner_extensions(
        &self,
        scope: &ScopeHash,
        token: FencingToken,
        extensions: &mut http::Extensions,
    ) {
        self.inner.owner_extensions(scope, token, extensions);
    }

    async fn release(&self, scope: &ScopeHash, token: FencingToken) -> Result<bool, StoreError> {
        self.inner.release(scope, token).await
    }

    async fn subscribe(&self, scope: &ScopeHash) -> Result<BoxSubscription, StoreError> {
        self.inner.subscribe(scope).await
    }

    async fn inspect(&self, scope: &ScopeHash) -> Result<KeyState, StoreError> {
        self.inner.inspect(scope).await
    }

    async fn forget(&self, scope: &ScopeHash) -> Result<bool, StoreError> {
        self.inner.forget(scope).await
    }

    async fn resolve(
        &self,
        scope: &ScopeHash,
        record: &Record,
        ttl: Duration,
    ) -> Result<Resolved, StoreError> {
        self.inner.resolve(scope, record, ttl).await
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn forwards_every_operation_to_the_boxed_store() {
        let memory = MemoryStore::default();
        let store = BoxStore::new(memory.clone());
        assert_eq!(Store::name(&store), "memory");
        assert!(std::ptr::eq(
            Arc::as_ptr(&BoxStore::new(store.clone()).inner).cast::<u8>(),
            Arc::as_ptr(&store.inner).cast::<u8>()
        ));
        let scope = ScopeHash::from_bytes([4; 32]);
        let fp = Fingerprint::from_bytes([5; 32]);
        let token = FencingToken::generate();
        let lease = Duration::from_secs(30);
        assert_eq!(
            Store::reserve(&store, &scope, &fp, token, lease.into())
                .await
                .unwrap(),
            Reservation::Reserved
        );
        assert!(matches!(
            Store::inspect(&memory, &scope).await.unwrap(),
            KeyState::InFlight { .. }
        ));
        assert!(Store::renew(&store, &scope, token, lease).await.unwrap());
        let mut subscription = Store::subscribe(&store, &scope).await.unwrap();
        let record = Record::NotReplayable;
        assert_eq!(
            Store::complete(&store, &scope, token, &record, lease)
                .await
                .unwrap(),
            Completion::Stored
        );
        tokio::time::timeout(
            Duration::from_secs(1),
            Subscription::changed(&mut subscription),
        )
        .await
        .expect("woken through the box");
        assert!(matches!(
            Store::inspect(&store, &scope).await.unwrap(),
            KeyState::Completed { .. }
        ));
        assert_eq!(
            Store::resolve(&store, &scope, &record, lease)
                .await
                .unwrap(),
            Resolved::Stored
        );
        assert!(Store::forget(&store, &scope).await.unwrap());
        assert!(!Store::release(&store, &scope, token).await.unwrap());
    }
}
