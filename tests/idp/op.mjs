// Strict third-party OpenID Provider (panva/oidc-provider) for end-to-end tests.
//
// Why: the outpost must interoperate with a spec-compliant OP that enforces PKCE, exact
// redirect_uri matching, nonce echo and real client authentication, instead of a mock that
// accepts anything. Everything is configured from the JSON file named by $OP_CONFIG:
//   { "port": 9400,
//     "clients": [{client_id, client_secret, redirect_uris, post_logout_redirect_uris,
//                  token_endpoint_auth_method, ...any other client metadata}],
//     "jwks_file": "/path/keys.json",      // list (or {keys: [...]}) of private RS256 JWKs; first signs
//     "accounts": { "alice": {email, name, preferred_username, groups, entitlements, ...} },
//     "ttl": { "IdToken": 3600, ... } }    // optional overrides
// State (sessions, grants, codes, opaque tokens) lives in memory only: a restart forgets it.
// Prints exactly one line `listening <issuer>` on stdout once the socket is bound.
import { readFileSync } from 'node:fs';
import Provider, { interactionPolicy } from 'oidc-provider';

const cfg = JSON.parse(readFileSync(process.env.OP_CONFIG, 'utf8'));
const port = Number(cfg.port);
const issuer = `http://127.0.0.1:${port}`;
const jwks = JSON.parse(readFileSync(cfg.jwks_file, 'utf8'));
const keys = Array.isArray(jwks) ? jwks : jwks.keys;
const accounts = cfg.accounts ?? {};

// Only fill in what the harness needs by default; explicit client metadata always wins.
const clients = cfg.clients.map((c) => ({
  grant_types: c.token_endpoint_auth_method === 'none'
    ? ['authorization_code', 'refresh_token']
    : ['authorization_code', 'refresh_token', 'client_credentials'],
  response_types: ['code'],
  ...c,
}));

const policy = interactionPolicy.base();
// Consent is always granted (loadExistingGrant below), so an explicit prompt=consent must not force
// a consent screen either: that keeps every headless login at one form POST, and prompt=consent
// still does what RPs send it for (keeping offline_access, i.e. issuing a refresh token).
policy.get('consent').checks.remove('consent_prompt');
// devInteractions accepts any login name. An id that findAccount does not know must send the
// user back to the login form (like a wrong password); without this check oidc-provider 9
// crashes with a 500 in the consent prompt because no account/grant is loaded.
policy.get('login').checks.push(new interactionPolicy.Check(
  'unknown_account', 'the logged-in account does not exist', 'login_required',
  (ctx) => (ctx.oidc.session.accountId && !ctx.oidc.account
    ? interactionPolicy.Check.REQUEST_PROMPT : interactionPolicy.Check.NO_NEED_TO_PROMPT),
));

const configuration = {
  clients,
  jwks: { keys },
  cookies: { keys: ['mitm-outpost-test-idp-cookie-key'] }, // fixed so restarts keep cookie signatures valid
  scopes: ['openid', 'profile', 'email', 'groups', 'entitlements', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'given_name', 'family_name', 'nickname', 'picture', 'locale', 'updated_at'],
    groups: ['groups'],
    entitlements: ['entitlements'],
  },
  conformIdTokenClaims: false, // scope-granted claims go into the ID token too, not only /me
  pkce: { required: () => true }, // every client, confidential ones included
  interactions: { policy },
  features: {
    devInteractions: { enabled: true }, // built-in login form: any password, login = account id
    rpInitiatedLogout: { enabled: true },
    introspection: {
      enabled: true,
      // same rule as the default, stated explicitly (and without the "SHOULD change" log noise)
      allowedPolicy: async (ctx, client, token) => client.clientAuthMethod !== 'none' || token.clientId === client.clientId,
    },
    revocation: { enabled: true },
    backchannelLogout: { enabled: true },
    clientCredentials: { enabled: true },
  },
  ttl: {
    AccessToken: 3600, AuthorizationCode: 60, ClientCredentials: 600, IdToken: 3600,
    RefreshToken: 86400, Interaction: 600, Session: 86400, Grant: 86400,
    ...(cfg.ttl ?? {}),
  },
  // oidc-provider 9 refuses outgoing requests (back-channel logout, remote jwks_uri) to loopback and
  // other special-use IPs (SSRF guard); every peer in these tests is on 127.0.0.1, so drop it.
  fetch: (url, { dispatcher, ...options }) => globalThis.fetch(url, options),
  // Only configured accounts exist (see the unknown_account check above).
  async findAccount(ctx, id) {
    if (!Object.hasOwn(accounts, id)) return undefined;
    return { accountId: id, async claims() { return { email_verified: true, ...accounts[id], sub: id }; } };
  },
  // Auto-consent: grant whatever was requested so the headless login needs no consent round trip.
  async loadExistingGrant(ctx) {
    const { client, session, params } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
    const grant = (grantId && await ctx.oidc.provider.Grant.find(grantId))
      || new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
    grant.addOIDCScope(params.scope || 'openid');
    await grant.save();
    return grant;
  },
};

const provider = new Provider(issuer, configuration);
// oidc-provider treats client_secret_basic and client_secret_post as interchangeable. Real OPs
// (Okta, Azure AD) do not, so enforce the registered method at every client-authenticated
// endpoint; this catches an RP that authenticates differently from how it was registered.
const authPaths = new Set(['/token', '/token/introspection', '/token/revocation']);
provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || !authPaths.has(ctx.path) || !ctx.is('application/x-www-form-urlencoded')) return next();
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  ctx.request.body = Buffer.concat(chunks).toString('utf8'); // oidc-provider parses it from here
  const body = new URLSearchParams(ctx.request.body);
  const [scheme, b64] = (ctx.get('authorization') || '').split(' ');
  const basic = scheme?.toLowerCase() === 'basic' && b64;
  let clientId = body.get('client_id');
  try {
    if (basic) clientId = decodeURIComponent(Buffer.from(b64, 'base64').toString().split(':')[0]);
  } catch { return next(); } // malformed header: oidc-provider produces the proper error
  const used = basic ? 'client_secret_basic' : (body.has('client_secret') ? 'client_secret_post' : undefined);
  const registered = clients.find((c) => c.client_id === clientId)?.token_endpoint_auth_method ?? 'client_secret_basic';
  if (used && used !== registered) {
    ctx.status = 401;
    ctx.body = { error: 'invalid_client', error_description: `client authenticated with ${used}, registered ${registered}` };
    return undefined;
  }
  return next();
});

// Surface OP-side failures (with their cause) in the harness's captured output, not just as a
// terse error response; back-channel logout delivery failures are only visible here.
provider.on('server_error', (ctx, err) => console.error('server_error', err));
for (const ev of ['authorization.error', 'grant.error', 'end_session.error', 'introspection.error',
  'revocation.error', 'userinfo.error', 'backchannel.error']) {
  provider.on(ev, (...args) => {
    const err = args.find((a) => a instanceof Error);
    console.error(ev, err?.message, err?.error_description ?? '', err?.cause?.message ?? '');
  });
}
provider.on('backchannel.success', (ctx, client, accountId, sid) => console.log('backchannel.success', client.clientId, accountId, sid));
// Static clients are validated lazily on first use; validate now so bad test metadata fails start().
for (const { client_id: id } of clients) await provider.Client.find(id);

// Die with the harness: the Python side holds our stdin open, so EOF means it went away
// (crashed or killed test run) and an orphaned OP would otherwise keep holding the port.
if (process.env.OP_EXIT_ON_STDIN_EOF === '1') process.stdin.on('end', () => process.exit(0)).resume();
provider.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
