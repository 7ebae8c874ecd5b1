/** The Tracker contract against the dm-era tracker, run inside a user-mode-linux guest on a real era target. */
import { describe, expect, it } from 'vitest';
import { explain, labSkipReason, runGuestSuite } from './guest-runner.js';

describe.skipIf(labSkipReason)('dm-era tracker in the guest', () => {
  it('passes the Tracker contract; cleanupStale drops a held metadata snapshot', async () => {
    const r = await runGuestSuite('dm-era-tracker.guest.ts', { disksMiB: [1024], timeoutMs: 570_000 });
    expect(r.code, explain(r)).toBe(0);
  }, 600_000);
});
