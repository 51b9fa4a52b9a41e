// Placeholder: the browser client is being written (see docs/client.md).
export const VERSION = "0.1.0";
