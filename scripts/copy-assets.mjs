// Copies non-TypeScript assets the compiled code loads at run time into dist/.
import { cpSync, mkdirSync } from 'node:fs';
mkdirSync('dist/proto', { recursive: true });
cpSync('proto/blocksnap.proto', 'dist/proto/blocksnap.proto');
