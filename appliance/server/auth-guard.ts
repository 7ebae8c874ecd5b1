import type { Socket } from 'node:net';

/**
 * Bounds on what an unauthenticated peer can make the appliance hold or do
 * (DESIGN.md §4.2, "pre-authentication bounds"):
 * - concurrent connections that have not authenticated yet, in total and
 *   per source address, counted from the TCP accept (over the limit: the
 *   socket is destroyed before any HTTP is parsed);
 * - failed authentications per source address: a token bucket of
 *   `failBurst` attempts refilled one per `failRefillMs`. An empty bucket
 *   refuses the source's upgrades (429) until a token is back, so a
 *   guesser gets one try per `failRefillMs` while other sources are untouched.
 * The per-source table is bounded too (`maxSources`; the oldest full
 * bucket is forgotten first).
 */
export interface AuthGuardLimits {
  maxPreAuth: number;
  maxPreAuthPerSource: number;
  failBurst: number;
  failRefillMs: number;
  maxSources: number;
}

export const DEFAULT_AUTH_GUARD_LIMITS: AuthGuardLimits = {
  maxPreAuth: 256,
  maxPreAuthPerSource: 16,
  failBurst: 10,
  failRefillMs: 2000,
  maxSources: 10_000,
};

interface Source {
  preAuth: number;
  tokens: number;
  refilledAt: number;
}

export type Admission = { ok: true } | { ok: false; status: 429 | 503; reason: string };

export class AuthGuard {
  private readonly sources = new Map<string, Source>();
  private readonly slots = new Map<string, () => void>();
  private preAuth = 0;
  readonly limits: AuthGuardLimits;

  constructor(limits: Partial<AuthGuardLimits> = {}, private readonly now: () => number = Date.now) {
    this.limits = { ...DEFAULT_AUTH_GUARD_LIMITS, ...limits };
  }

  /**
   * May a new TCP connection from `address` start authenticating (the
   * connection counts)? Does not count it: `opened` does.
   */
  admitConnection(address: string): Admission {
    const s = this.sources.get(sourceKey(address));
    if (this.preAuth >= this.limits.maxPreAuth) return { ok: false, status: 503, reason: 'too many connections authenticating' };
    if (s && s.preAuth >= this.limits.maxPreAuthPerSource) return { ok: false, status: 503, reason: 'too many connections authenticating from this address' };
    return { ok: true };
  }

  /** May `address` try to authenticate now (its failure bucket is not empty)? */
  admitAttempt(address: string): Admission {
    const s = this.sources.get(sourceKey(address));
    if (s) this.refill(s);
    if (s && s.tokens < 1) return { ok: false, status: 429, reason: 'too many failed authentications from this address' };
    return { ok: true };
  }

  /** A connection from `address` is authenticating; returns the call that ends that (idempotent). */
  opened(address: string): () => void {
    const key = sourceKey(address);
    const s = this.source(key);
    s.preAuth++;
    this.preAuth++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      s.preAuth--;
      this.preAuth--;
      this.forgetIfIdle(key, s);
    };
  }

  /**
   * Counts an accepted TCP connection as authenticating from now on; false
   * (the caller destroys it) when a connection bound is reached. The slot is
   * released when the socket closes or `slotOf(...)()` is called (Welcome),
   * and a socket still unauthenticated after `timeoutMs` is destroyed (one
   * that never sends a complete HTTP request included).
   */
  track(socket: Socket, timeoutMs: number): boolean {
    const address = socket.remoteAddress ?? '';
    if (!this.admitConnection(address).ok) return false;
    const key = `${address}:${socket.remotePort}`;
    const release = this.opened(address);
    const timer = setTimeout(() => socket.destroy(), timeoutMs);
    timer.unref();
    const end = () => {
      clearTimeout(timer);
      release();
      if (this.slots.get(key) === end) this.slots.delete(key);
    };
    this.slots.set(key, end);
    socket.once('close', end);
    return true;
  }

  /** The call that ends the authenticating slot of the connection from `address`:`port` (a no-op if untracked). */
  slotOf(address: string, port: number | undefined): () => void {
    return this.slots.get(`${address}:${port}`) ?? (() => undefined);
  }

  /** A failed authentication from `address`: takes a token. */
  failed(address: string): void {
    const s = this.source(sourceKey(address));
    this.refill(s);
    s.tokens = Math.max(0, s.tokens - 1);
  }

  get authenticating(): number {
    return this.preAuth;
  }

  private source(key: string): Source {
    let s = this.sources.get(key);
    if (!s) {
      if (this.sources.size >= this.limits.maxSources) this.evict();
      s = { preAuth: 0, tokens: this.limits.failBurst, refilledAt: this.now() };
      this.sources.set(key, s);
    }
    return s;
  }

  private refill(s: Source): void {
    const t = this.now();
    const add = Math.floor((t - s.refilledAt) / this.limits.failRefillMs);
    if (add > 0) {
      s.tokens = Math.min(this.limits.failBurst, s.tokens + add);
      s.refilledAt = s.tokens === this.limits.failBurst ? t : s.refilledAt + add * this.limits.failRefillMs;
    }
  }

  private forgetIfIdle(key: string, s: Source): void {
    this.refill(s);
    if (s.preAuth === 0 && s.tokens >= this.limits.failBurst) this.sources.delete(key);
  }

  /** Drops an idle source with a full bucket (Map order = oldest first); if none, the oldest idle one. */
  private evict(): void {
    let fallback: string | undefined;
    for (const [k, s] of this.sources) {
      if (s.preAuth > 0) continue;
      this.refill(s);
      if (s.tokens >= this.limits.failBurst) {
        this.sources.delete(k);
        return;
      }
      fallback ??= k;
    }
    if (fallback !== undefined) this.sources.delete(fallback);
  }
}

/** One key per host: IPv4-mapped IPv6 addresses are their IPv4 address. */
export function sourceKey(address: string): string {
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}
