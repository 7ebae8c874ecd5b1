import { describe, expect, it } from 'vitest';
import { AuthGuard, sourceKey } from '../../appliance/server/auth-guard.js';

/** The bookkeeping of auth-guard.ts with a fake clock (the sockets are tested in auth.test.ts). */
describe('AuthGuard', () => {
  it('a source gets failBurst failures, then one per failRefillMs; other sources are untouched', () => {
    let now = 0;
    const g = new AuthGuard({ failBurst: 3, failRefillMs: 1000 }, () => now);
    for (let i = 0; i < 3; i++) {
      expect(g.admitAttempt('10.0.0.1').ok).toBe(true);
      g.failed('10.0.0.1');
    }
    expect(g.admitAttempt('10.0.0.1')).toMatchObject({ ok: false, status: 429 });
    expect(g.admitAttempt('10.0.0.2').ok).toBe(true);
    now = 999;
    expect(g.admitAttempt('10.0.0.1').ok).toBe(false);
    now = 1000;
    expect(g.admitAttempt('10.0.0.1').ok).toBe(true);
    g.failed('10.0.0.1');
    expect(g.admitAttempt('10.0.0.1').ok).toBe(false);
    now = 10_000; // a long quiet time refills to the burst, not beyond
    for (let i = 0; i < 3; i++) g.failed('10.0.0.1');
    expect(g.admitAttempt('10.0.0.1').ok).toBe(false);
  });

  it('bounds authenticating connections per source and in total; a released slot is free again', () => {
    const g = new AuthGuard({ maxPreAuth: 3, maxPreAuthPerSource: 2 });
    const a1 = g.opened('10.0.0.1');
    g.opened('10.0.0.1');
    expect(g.admitConnection('10.0.0.1')).toMatchObject({ ok: false, status: 503 });
    expect(g.admitConnection('10.0.0.2').ok).toBe(true);
    g.opened('10.0.0.2');
    expect(g.admitConnection('10.0.0.3')).toMatchObject({ ok: false, status: 503 });
    a1();
    a1(); // idempotent
    expect(g.authenticating).toBe(2);
    expect(g.admitConnection('10.0.0.1').ok).toBe(true);
    expect(g.admitConnection('10.0.0.3').ok).toBe(true);
  });

  it('IPv4-mapped IPv6 addresses are the same source as their IPv4 address', () => {
    expect(sourceKey('::ffff:127.0.0.1')).toBe('127.0.0.1');
    const g = new AuthGuard({ failBurst: 1 });
    g.failed('::ffff:10.0.0.9');
    expect(g.admitAttempt('10.0.0.9').ok).toBe(false);
  });

  it('the source table stays bounded: idle sources with a full bucket are forgotten first', () => {
    let now = 0;
    const g = new AuthGuard({ failBurst: 2, failRefillMs: 1000, maxSources: 3 }, () => now);
    g.failed('10.0.0.1'); // keeps its entry (bucket not full)
    for (let i = 2; i <= 10; i++) g.opened(`10.0.0.${i}`)(); // opened and released: forgotten at once
    g.failed('10.0.0.11');
    g.failed('10.0.0.12');
    g.failed('10.0.0.13'); // table full of non-full buckets: the oldest (10.0.0.1) goes
    expect(g.admitAttempt('10.0.0.12').ok).toBe(true);
    g.failed('10.0.0.12');
    expect(g.admitAttempt('10.0.0.12').ok).toBe(false);
  });
});
