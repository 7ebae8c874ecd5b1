import { defineConfig } from 'vitest/config';

/**
 * Vitest inside the user-mode-linux guest (test/lvm/guest-suites.test.ts
 * boots it): only the guest suites, one file at a time, in ONE process
 * (isolate: false): under ptrace a fresh worker per file costs seconds of
 * node start-up and module loading, and the files share most modules. The
 * suites share no state but the disk: clean-slate.ts clears it between files.
 */
export default defineConfig({
  test: {
    include: ['test/lvm/guest/**/*.guest.ts'],
    setupFiles: ['test/lvm/guest/clean-slate.ts'],
    testTimeout: 300_000, // one test took 108 s at load 14; npm test shares the machine with host tests
    hookTimeout: 240_000,
    maxWorkers: 1,
    pool: 'forks',
    isolate: false,
    fileParallelism: false,
    cache: false,
  },
});
