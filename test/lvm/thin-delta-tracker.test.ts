/** The Tracker contract against the thin-delta tracker, run inside a user-mode-linux guest on a real thin pool. */
import { describe, expect, it } from 'vitest';
import { explain, labSkipReason, runGuestSuite } from './guest-runner.js';

describe.skipIf(labSkipReason)('thin-delta tracker in the guest', () => {
  it('passes the Tracker contract; keeps one basis; a removed basis invalidates; cleanupStale releases a reserved metadata snapshot', async () => {
    const r = await runGuestSuite('thin-delta-tracker.guest.ts', { disksMiB: [1024], timeoutMs: 840_000 }); // 460 s measured at load 13
    expect(r.code, explain(r)).toBe(0);
  }, 900_000);
});
