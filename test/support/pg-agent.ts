/** Moved to scripts/lab/pg-agent.ts (scripts/bench-mount.ts uses it; dist/ holds no test code): this path stays for the tests. */
export * from '../../scripts/lab/pg-agent.js';
