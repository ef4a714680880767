/* SPDX-License-Identifier: MIT */
/* STUB: to be written */
int main(void) { return 0; }
