//! Credentials asked for at every connection attempt, so that a rotated password is picked up on
//! the next reconnect (see [`AmqpRouterBuilder::credentials_provider`](crate::AmqpRouterBuilder::credentials_provider)).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A user name and password for one connection attempt. `Debug` shows the user name, never the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    /// The credentials of `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// The error a credentials provider returns: anything that converts into a boxed error (a
/// `String`, an `std::io::Error`, an `anyhow::Error`...). Its text, followed by its causes'
/// (`source()`), is logged and put in the router's errors, so it must not carry a secret.
pub type CredentialsError = Box<dyn std::error::Error + Send + Sync>;

type Asked = Pin<Box<dyn Future<Output = Result<Credentials, CredentialsError>> + Send>>;

/// The provider set on the builder, shared by the router's two connections.
#[derive(Clone)]
pub(crate) struct CredentialsProvider(Arc<dyn Fn() -> Asked + Send + Sync>);

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialsProvider(..)")
    }
}

impl CredentialsProvider {
    pub(crate) fn new<F, Fut, E>(provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Credentials, E>> + Send + 'static,
        E: Into<CredentialsError>,
    {
        CredentialsProvider(Arc::new(move || {
            let asked = provider();
            Box::pin(async move { asked.await.map_err(Into::into) })
        }))
    }

    /// Asks the provider once, on a task of its own on `runtime` (so that a panic in it is an error
    /// here, not the end of the reconnect loop), for at most `timeout`. The task is aborted when
    /// the time is up, and also when this call is dropped before the answer (a `connect` cut short
    /// by the caller's timeout): a provider that hangs is never left running with nobody waiting.
    /// The error says what went wrong, with the provider's own error text.
    pub(crate) async fn ask(
        &self,
        runtime: &tokio::runtime::Handle,
        timeout: Duration,
        timeout_source: &str,
    ) -> Result<Credentials, String> {
        let provider = self.0.clone();
        let mut task = AbortOnDrop(runtime.spawn(async move { provider().await }));
        match tokio::time::timeout(timeout, &mut task.0).await {
            Ok(Ok(Ok(credentials))) => Ok(credentials),
            Ok(Ok(Err(error))) => Err(format!(
                "the credentials provider failed: {}",
                with_causes(&*error)
            )),
            Ok(Err(error)) if error.is_panic() => Err("the credentials provider panicked".into()),
            Ok(Err(error)) => Err(format!(
                "the credentials provider's task ended early: {error}"
            )),
            Err(_) => Err(format!(
                "the credentials provider did not answer within {timeout:?} ({timeout_source})"
            )),
        }
    }
}

/// `error`'s text followed by its causes' (`source()`), as anyhow's `{:#}` shows them: the cause is
/// often what names the fix ("connection refused" under "error sending request").
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// Aborts its task when dropped (a finished task is left as it is).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose cause is in `source()`, as most client libraries' are.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("reading the secret from vault")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn debug_shows_the_user_but_never_the_password() {
        let credentials = Credentials::new("app", "s3cret-rotated");
        let debug = format!("{credentials:?}");
        assert!(!debug.contains("s3cret-rotated"), "{debug}");
        assert!(debug.contains("\"app\""), "{debug}");
        let provider = CredentialsProvider::new(|| async {
            Ok::<_, String>(Credentials::new("app", "s3cret-rotated"))
        });
        let debug = format!("{provider:?}");
        assert!(!debug.contains("s3cret-rotated"), "{debug}");
    }

    #[tokio::test]
    async fn a_provider_that_fails_hangs_or_panics_is_an_error_not_a_hang() {
        let runtime = tokio::runtime::Handle::current();
        let bound = Duration::from_millis(200);
        let failing = CredentialsProvider::new(|| async { Err::<Credentials, _>("vault sealed") });
        let error = failing
            .ask(&runtime, bound, "connect_timeout")
            .await
            .unwrap_err();
        assert_eq!(error, "the credentials provider failed: vault sealed");

        let wrapped = CredentialsProvider::new(|| async {
            let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
            Err::<Credentials, _>(Wrapped(cause))
        });
        let error = wrapped
            .ask(&runtime, bound, "connect_timeout")
            .await
            .unwrap_err();
        assert_eq!(
            error,
            "the credentials provider failed: reading the secret from vault: refused"
        );

        let hung = CredentialsProvider::new(std::future::pending::<Result<Credentials, String>>);
        let started = tokio::time::Instant::now();
        let error = tokio::time::timeout(
            Duration::from_secs(5),
            hung.ask(&runtime, bound, "connect_timeout"),
        )
        .await
        .expect("bounded by its timeout")
        .unwrap_err();
        assert!(started.elapsed() >= bound, "{error}");
        assert_eq!(
            error,
            "the credentials provider did not answer within 200ms (connect_timeout)"
        );

        let panicking = CredentialsProvider::new(|| async {
            panic!("a bug in the provider");
            #[allow(unreachable_code)]
            Ok::<_, String>(Credentials::new("app", "pw"))
        });
        let error = panicking
            .ask(&runtime, bound, "connect_timeout")
            .await
            .unwrap_err();
        assert_eq!(error, "the credentials provider panicked");

        let fine =
            CredentialsProvider::new(|| async { Ok::<_, String>(Credentials::new("a", "b")) });
        assert_eq!(
            fine.ask(&runtime, bound, "connect_timeout").await.unwrap(),
            Credentials::new("a", "b")
        );
    }

    /// A provider that hangs, whose caller stops waiting before `connect_timeout` (a `connect` under
    /// a shorter timeout of the caller's): its call is dropped with the wait, not left running.
    #[tokio::test]
    async fn a_call_whose_caller_stops_waiting_is_dropped_with_it() {
        /// Tells when the provider's call is dropped.
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                if let Some(dropped) = self.0.take() {
                    let _ = dropped.send(());
                }
            }
        }
        let (dropped, was_dropped) = tokio::sync::oneshot::channel();
        let dropped = std::sync::Mutex::new(Some(dropped));
        let hung = CredentialsProvider::new(move || {
            let dropped = Dropped(dropped.lock().expect("dropped lock").take());
            async move {
                let _held = dropped;
                std::future::pending::<Result<Credentials, String>>().await
            }
        });
        let runtime = tokio::runtime::Handle::current();
        let cut_short = tokio::time::timeout(
            Duration::from_millis(100),
            hung.ask(&runtime, Duration::from_secs(3600), "connect_timeout"),
        )
        .await;
        assert!(cut_short.is_err(), "the provider never answers");
        tokio::time::timeout(Duration::from_secs(5), was_dropped)
            .await
            .expect("the provider's call is dropped once nobody waits for it")
            .expect("dropped, not forgotten");
    }
}
