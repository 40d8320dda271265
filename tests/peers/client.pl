#!/usr/bin/perl
# A real Perl Gearman::Client (2.004) for integration tests: submits one job, waits for it,
# prints one JSON line {"state": "complete"|"fail", "result": TEXT|null}; exit 0 on
# complete, 1 on fail.
#
# Usage: client.pl HOST:PORT FUNCTION PAYLOAD [--unique U] [--timeout S]
#                  [--tls [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]]
#
# --tls connects over TLS as the library does it (job server { use_ssl => 1, ca_file,
# cert_file, key_file }: IO::Socket::SSL, checking the server's certificate against
# ca_file and its name against HOST).
use strict;
use warnings;

use FindBin ();
use lib $FindBin::Bin;
use Getopt::Long qw(GetOptions);
use TlsJobServer ();
use IO::Handle;
use JSON::PP ();
use Gearman::Client;

my $USAGE = "usage: $0 HOST:PORT FUNCTION PAYLOAD [--unique U] [--timeout S]"
    . " [--tls [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]]\n";
my ($unique, $tls, $tls_ca, $tls_cert, $tls_key);
my $timeout = 30;
GetOptions(
    "unique=s"   => \$unique,
    "timeout=f"  => \$timeout,
    "tls"        => \$tls,
    "tls-ca=s"   => \$tls_ca,
    "tls-cert=s" => \$tls_cert,
    "tls-key=s"  => \$tls_key,
) or die $USAGE;
@ARGV == 3 or die $USAGE;
my ($address, $function, $payload) = @ARGV;
my $job_server = TlsJobServer::job_server($address, $tls, $tls_ca, $tls_cert, $tls_key);

STDOUT->autoflush(1);
my $client = Gearman::Client->new(job_servers => [$job_server]);
my $result = $client->do_task(
    $function, $payload,
    { (defined $unique ? (uniq => $unique) : ()), timeout => $timeout },
);
print JSON::PP->new->canonical->encode(
    { state => defined $result ? "complete" : "fail", result => defined $result ? $$result : undef }
), "\n";
exit(defined $result ? 0 : 1);
