/**
 * Bad input for the LVM providers, inside a user-mode-linux guest: missing
 * VG or LV, an LV that is not the mountpoint's device, no free extents, a
 * CoW area that fills (failed before overflow) or overflows (never read), a
 * thin pool filling during the job, lvcreate failing midway (snapshot made,
 * activation failing), and the orphans of a kill -9 removed by the next
 * agent, only its own. (A consistency group failing midway: snapshot-provider.)
 * The kill -9 case runs the compiled provider (`npm run build`).
 */
import { describe, expect, it } from 'vitest';
import { explain, labSkipReason, runGuestSuite } from './guest-runner.js';

describe.skipIf(labSkipReason)('LVM bad input in the guest', () => {
  it('every case is a clear error and leaves nothing behind', async () => {
    const r = await runGuestSuite('bad-input.guest.ts', { disksMiB: [1024], timeoutMs: 420_000 });
    expect(r.code, explain(r)).toBe(0);
  }, 450_000);
});
