/** The SnapshotProvider contract against lvm-thin and lvm-classic, run inside a user-mode-linux guest. */
import { describe, expect, it } from 'vitest';
import { explain, labSkipReason, runGuestSuite } from './guest-runner.js';

describe.skipIf(labSkipReason)('LVM snapshot providers in the guest', () => {
  it('lvm-thin and lvm-classic pass the SnapshotProvider contract', async () => {
    const r = await runGuestSuite('snapshot-provider.guest.ts', { disksMiB: [2048], timeoutMs: 570_000 });
    expect(r.code, explain(r)).toBe(0);
  }, 600_000);
});
