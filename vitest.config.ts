import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 180_000,
    // Tests that attach loop devices, start PostgreSQL or spawn daemons are
    // heavy on a 2-core machine; two files at a time keeps them honest.
    maxWorkers: 2,
    pool: 'forks',
  },
});
