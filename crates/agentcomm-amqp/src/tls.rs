//! TLS for `amqps://` URLs, through amqprs's rustls adaptor.

use std::panic::AssertUnwindSafe;

use amqprs::tls::TlsAdaptor;

use crate::url::AmqpUrl;

/// Installs ring as rustls's process-wide crypto provider unless the application installed one:
/// amqprs builds its TLS configuration with `ClientConfig::builder()`, which needs one.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: one is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The TLS adaptor for `url`: the system's web PKI roots, or `cacertfile`; a client certificate
/// when `certfile` and `keyfile` are given; the host name (or `server_name_indication`) verified.
pub(crate) fn adaptor(url: &AmqpUrl) -> Result<TlsAdaptor, String> {
    ensure_crypto_provider();
    let domain = url.server_name.clone().unwrap_or_else(|| url.host.clone());
    // amqprs unwraps a few results while reading certificates (a CA file that is not a certificate,
    // a key that does not match): turn those panics into an error.
    let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match (&url.client_cert, &url.client_key) {
            (Some(cert), Some(key)) => {
                TlsAdaptor::with_client_auth(url.ca_cert.as_deref(), cert, key, domain.clone())
            }
            _ => TlsAdaptor::without_client_auth(url.ca_cert.as_deref(), domain.clone()),
        }
    }));
    match built {
        Ok(Ok(adaptor)) => Ok(adaptor),
        Ok(Err(error)) => Err(format!(
            "could not set up TLS: {error} (check cacertfile, certfile and keyfile in the URL)"
        )),
        Err(_) => Err(
            "could not set up TLS: a certificate or key file is not valid PEM, or the key does not match the certificate"
                .to_string(),
        ),
    }
}
