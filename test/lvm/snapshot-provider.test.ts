/** The SnapshotProvider contract against lvm-thin and lvm-classic, run inside a user-mode-linux guest. */
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { registry } from '../../agent/compose.js';
import type { AgentConfig } from '../../agent/config.js';
import { explain, labSkipReason, runGuestSuite } from './guest-runner.js';

describe.skipIf(labSkipReason)('LVM snapshot providers in the guest', () => {
  it('lvm-thin and lvm-classic pass the SnapshotProvider contract', async () => {
    const r = await runGuestSuite('snapshot-provider.guest.ts', { disksMiB: [2048], timeoutMs: 840_000 });
    expect(r.code, explain(r)).toBe(0);
  }, 900_000); // the lvm-classic contract runs its createGroup test now (≈ 40 s more in a loaded guest)
});

// lvm-classic groups were off for agents until the contract's rare group failure was found to be the
// test's read-back (debugfsCat); 22 group rounds in a row then passed in the guest. lvm-thin cannot (DESIGN §7.4).
it('agents compose lvm-classic with consistency groups (createGroup) and lvm-thin without', async () => {
  const ctx = { config: { agent: 'a1', stateDir: '/nonexistent-state' } as AgentConfig, log: pino({ level: 'silent' }) };
  expect(typeof (await registry.providers['lvm-classic']!(ctx)).createGroup).toBe('function');
  expect((await registry.providers['lvm-thin']!(ctx)).createGroup).toBeUndefined();
});
