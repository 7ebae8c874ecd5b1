import { defineConfig } from 'vitest/config';

/**
 * Vitest inside the user-mode-linux guest (test/lvm/*.test.ts boot it): only
 * the guest suites, one file at a time, one process (the guest has one slow CPU).
 */
export default defineConfig({
  test: {
    include: ['test/lvm/guest/**/*.guest.ts'],
    testTimeout: 300_000, // one test took 108 s at load 14; npm test shares the machine with host tests
    hookTimeout: 240_000,
    maxWorkers: 1,
    pool: 'forks',
    fileParallelism: false,
    cache: false,
  },
});
