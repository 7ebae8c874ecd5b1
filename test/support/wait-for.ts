/** Moved to scripts/lab/wait-for.ts (scripts/bench-mount.ts uses it; dist/ holds no test code): this path stays for the tests. */
export * from '../../scripts/lab/wait-for.js';
