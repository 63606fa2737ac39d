/* LD_PRELOAD shim for wrk, used by peers-tls.sh for the fullN scenarios.
 *
 * wrk keeps one SSL object per connection and, on reconnect, calls SSL_shutdown + SSL_clear,
 * which keeps the session: the next SSL_connect offers it and the server resumes it (TLS 1.3
 * PSK from a ticket; ECDHE is still done, the certificate signature is not). This wrapper drops
 * the session after SSL_clear, so every new connection makes a full handshake.
 * Build: cc -O2 -shared -fPIC -o wrk-noresume.so wrk-noresume.c -ldl  (no OpenSSL headers needed) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
extern int SSL_set_session(SSL *s, SSL_SESSION *session);

int SSL_clear(SSL *s) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    int r = real(s);
    SSL_set_session(s, NULL);
    return r;
}
